import os

import torch

# Triton kernels run on CPU tensors under its interpreter; it must be chosen before triton is
# imported. With a GPU they run for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "op_targets(*names): run only on these targets of the op matrix "
        "(tests/op_fixtures.py TARGETS); on a test or on one of its parameters")


def pytest_generate_tests(metafunc):
    """A test taking `op_target` runs on every target of the op matrix its module names in
    OP_TARGETS (a test imported into another module runs on that module's)."""
    if "op_target" not in metafunc.fixturenames:
        return
    from op_fixtures import target_param

    names = getattr(metafunc.module, "OP_TARGETS", None)
    if names is None:
        raise ValueError(f"{metafunc.module.__name__} has tests taking `op_target` but no "
                         f"OP_TARGETS")
    metafunc.parametrize("op_target", [target_param(n) for n in names])


def pytest_collection_modifyitems(config, items):
    """Items whose target an `op_targets` mark (of the test or of its case) leaves out are
    deselected (not run, and not counted as skipped)."""
    def wanted(item) -> bool:
        callspec = getattr(item, "callspec", None)
        if callspec is None or "op_target" not in callspec.params:
            return True
        name = callspec.params["op_target"].name
        return all(name in mark.args for mark in item.iter_markers("op_targets"))

    dropped = [item for item in items if not wanted(item)]
    if dropped:
        items[:] = [item for item in items if wanted(item)]
        config.hook.pytest_deselected(items=dropped)
