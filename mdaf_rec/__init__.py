"""mdaf_rec: MDAF (Multi-branch Dual Attention Fusion) click-through-rate models on TorchRec.

The public names::

    from mdaf_rec import load_config, FeatureSpec, build_model, CTRTrain   # a model from a config
    from mdaf_rec import build_train_module                               # ... as training builds it
    from mdaf_rec import MDAF_Mamba, MDAF_BST                             # the research code's interface
    from mdaf_rec import eval_run, export_run                             # a trained run
    import mdaf_rec.train; mdaf_rec.train.train(cfg, out)                 # the training recipe

``train``, ``export`` and ``predict`` are modules of this package (so ``mdaf_rec.train`` is the module).
Names are imported on first use (:mod:`mdaf_rec.lazy_exports`): ``import mdaf_rec`` loads neither torch nor
TorchRec. The command line is :mod:`mdaf_rec.cli`.
"""

from mdaf_rec.lazy_exports import lazy_exports

_EXPORTS = {
    "Config": "mdaf_rec.config",
    "ConfigError": "mdaf_rec.config",
    "load_config": "mdaf_rec.config",
    "dump_config": "mdaf_rec.config",
    "UserError": "mdaf_rec.errors",
    "MODEL_NAMES": "mdaf_rec.registry",
    "FeatureSpec": "mdaf_rec.features",
    "Batch": "mdaf_rec.data.batch",
    "MDAF": "mdaf_rec.models.mdaf",
    "DCNv3CTR": "mdaf_rec.models.baselines",
    "SequenceCTR": "mdaf_rec.models.baselines",
    "CTRModel": "mdaf_rec.models.ctr",
    "CTROutput": "mdaf_rec.models.ctr",
    "CTRTrain": "mdaf_rec.models.ctr",
    "build_model": "mdaf_rec.models.factory",
    "build_train_module": "mdaf_rec.trainable",
    "MDAF_Mamba": "mdaf_rec.models.research_api",
    "MDAF_BST": "mdaf_rec.models.research_api",
    "eval_run": "mdaf_rec.train",
    "export_run": "mdaf_rec.export",
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
