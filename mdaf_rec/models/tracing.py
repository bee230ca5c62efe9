"""Whether code runs under a tracer (torch.export, dynamo, fx, TorchScript)."""

import logging

import torch

_IS_FX_TRACING_NOTICE = "is_fx_tracing will return true for both fx.symbolic_trace and torch.export"


def is_tracing() -> bool:
    """True under torch.export / dynamo / fx / TorchScript, where data-dependent checks are skipped."""
    if torch.jit.is_scripting():
        return True
    compiler = torch.compiler
    if compiler.is_compiling() or (hasattr(compiler, "is_exporting") and compiler.is_exporting()):
        return True
    # is_fx_symbolic_tracing (unlike is_fx_tracing) does not log a warning on every call.
    return torch.fx._symbolic_trace.is_fx_symbolic_tracing()


class _DropIsFxTracingNotice(logging.Filter):
    """Drops torch.fx's "is_fx_tracing will return true for both ..." warning, and only that record.

    Its caller is torch itself: ``torch.fx.ProxyableClassMeta.__call__``, the metaclass of TorchRec's
    ``KeyedJaggedTensor``, calls the deprecated ``is_fx_tracing()`` on every KJT construction (the
    data loader builds KJTs in train, eval and predict), and its first call in each process logs this
    advice meant for torch's own code. Nothing here can act on it; torch 2.13, torchrec 1.8.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_IS_FX_TRACING_NOTICE)


logging.getLogger("torch.fx._symbolic_trace").addFilter(_DropIsFxTracingNotice())
