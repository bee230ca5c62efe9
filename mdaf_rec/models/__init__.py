"""The models: MDAF (DCNv3 static branch + Mamba4Rec | BST sequential branch, gated fusion, MLP head), the
single-branch baselines, the training wrapper, the factory, and the research code's interface.

Names are imported on first use (:mod:`mdaf_rec.lazy_exports`): ``import mdaf_rec.models.mamba`` does not
pull in TorchRec through this package.
"""

from mdaf_rec.lazy_exports import lazy_exports

_EXPORTS = {
    "MDAF": "mdaf_rec.models.mdaf",
    "DCNv3CTR": "mdaf_rec.models.baselines",
    "SequenceCTR": "mdaf_rec.models.baselines",
    "CTRModel": "mdaf_rec.models.ctr",
    "CTROutput": "mdaf_rec.models.ctr",
    "CTRTrain": "mdaf_rec.models.ctr",
    "build_model": "mdaf_rec.models.factory",
    "MDAF_Mamba": "mdaf_rec.models.research_api",
    "MDAF_BST": "mdaf_rec.models.research_api",
    "DCNv3": "mdaf_rec.models.dcnv3",
    "Mamba4RecEncoder": "mdaf_rec.models.mamba",
    "BSTEncoder": "mdaf_rec.models.bst",
    "GatedFusion": "mdaf_rec.models.fusion",
    "PredictionHead": "mdaf_rec.models.head",
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
