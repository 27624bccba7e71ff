"""What torch operations run and allocate, counted where they dispatch, and a kernel that only
counts its launches: how the GPU path's tests and `scripts/bench_gpu.py` show that a logged step
makes no tensor, reads nothing back and launches a fixed number of kernels."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class TorchOps(TorchDispatchMode):
    """Inside `with TorchOps() as ops:`, the torch operations run (`ops.names`) and the bytes of
    the new storage they made (`ops.bytes`): a view or an in-place result shares an input's
    storage and is not counted, nor is a storage counted twice. The storages counted are held
    until the block ends, so that one freed inside it cannot pass its address on to a new one
    (which would then go uncounted): the count is every byte the block made, not its peak.

    >>> with TorchOps() as ops:
    ...     x = torch.zeros(4)
    ...     y = x.add_(1).view(2, 2)
    >>> ops.names, ops.bytes
    (['aten.zeros.default', 'aten.add_.Tensor', 'aten.view.default'], 16)
    """

    def __init__(self):
        super().__init__()
        self.names, self.bytes, self._seen, self._held = [], 0, set(), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.names.append(str(func))
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        inputs = {t.untyped_storage().data_ptr() for t in tensors}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs | self._seen:
                storage = t.untyped_storage()
                self._seen.add(storage.data_ptr())
                self._held.append(storage)
                self.bytes += storage.nbytes()
        return out

    def __exit__(self, *exc):
        self._held = []
        return super().__exit__(*exc)


class Launches:
    """A Triton kernel's stand-in (`kernel[grid](...)`) that does nothing but count its launches
    in `Launches.count`, over every instance: what the host does is then what is measured."""

    count = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            Launches.count += 1
        return launch
