"""Whether code runs under a tracer (torch.export, dynamo, fx, TorchScript)."""

import torch


def is_tracing() -> bool:
    """True under torch.export / dynamo / fx / TorchScript, where data-dependent checks are skipped."""
    if torch.jit.is_scripting():
        return True
    compiler = torch.compiler
    if compiler.is_compiling() or (hasattr(compiler, "is_exporting") and compiler.is_exporting()):
        return True
    # is_fx_symbolic_tracing (unlike is_fx_tracing) does not log a warning on every call.
    return torch.fx._symbolic_trace.is_fx_symbolic_tracing()
