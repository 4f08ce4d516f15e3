"""The GPU training fast path: a loss's forward and backward captured as CUDA graphs.

Why: a training window is a few hundred small steps of a neural ODE (RK4 stages of the unit
models and the residual network), each a handful of tiny kernels. On a GPU eager autograd
spends its time launching them, not running them: forward+backward costs about the same at
batch 1 as at batch 131,072 (issue 9, measured on an H200). `torch.cuda.make_graphed_callables`
records every kernel of one forward and one backward once and replays them with one launch
each, so the Python and launch overhead of the whole window rollout is paid once per capture.

Rules the captured code keeps (the loss modules here do): no host synchronisation inside
(no `.item()`, `bool(tensor)`, data-dependent shapes), no randomness, the same input shapes on
every call. A capture belongs to one input signature (shapes, dtypes, device) and to one set of
trainable parameters (the two-stage schedule freezes the networks first): `CapturedLoss` keeps
a capture per signature and recaptures when the trainable set changes. Parameters updated in
place by the optimiser are read by the replay, so training needs nothing else.
"""

from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch
from torch import Tensor, nn


class CapturedLoss:
    """Calls a loss module through CUDA graphs, capturing once per input signature.

    Args:
        factory: returns a fresh module computing the loss terms from tensors; every module it
            returns must share the same parameters (a thin wrapper around one model).
            The first output must be the scalar loss.
        max_captures: captures kept (each holds its own memory pool); the oldest goes first.

    Calls return exactly what the module returns, as replayed outputs that autograd
    differentiates through the captured backward graph (gradients accumulate into `.grad`
    as usual).
    """

    def __init__(self, factory: Callable[[], nn.Module], max_captures: int = 4) -> None:
        if max_captures < 1:
            raise ValueError(f"CapturedLoss: max_captures must be >= 1, got {max_captures}")
        self.factory = factory
        self.max_captures = int(max_captures)
        self._parameters = list(factory().parameters())
        self._captures: OrderedDict[Hashable, nn.Module] = OrderedDict()
        self._trainable: tuple[bool, ...] | None = None
        self.n_captures = 0  # captures made so far (a test and the logs read it)

    def __call__(self, *args: Tensor) -> tuple[Tensor, ...]:
        for i, arg in enumerate(args):
            if not arg.is_cuda:
                raise ValueError(
                    f"CapturedLoss: argument {i} is on {arg.device}; CUDA graphs need CUDA tensors"
                )
        trainable = tuple(p.requires_grad for p in self._parameters)
        if trainable != self._trainable:
            # A stage froze or unfroze parameters: old captures compute the wrong gradients.
            self._captures.clear()
            self._trainable = trainable
        key = tuple((tuple(a.shape), a.dtype, a.device, a.requires_grad) for a in args)
        graphed = self._captures.get(key)
        if graphed is None:
            graphed = self._capture(args)
            self._captures[key] = graphed
            if len(self._captures) > self.max_captures:
                self._captures.popitem(last=False)
        else:
            self._captures.move_to_end(key)
        return graphed(*args)

    def _capture(self, args: tuple[Tensor, ...]) -> nn.Module:
        # Clones: the capture reads its static inputs from these, and the caller's tensors
        # are copied into them on every replay.
        sample = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)
        # Two warm-up passes (lazy library initialisation stays out of the capture); each costs
        # an eager step, and a capture is made once per signature and stage.
        graphed = torch.cuda.make_graphed_callables(
            self.factory(), sample, num_warmup_iters=2, allow_unused_input=True
        )
        self.n_captures += 1
        return graphed


def cuda_graphs_usable(tensor: Tensor) -> bool:
    """Whether a training step on `tensor`'s device can run through CUDA graphs: a CUDA tensor,
    gradients on, no inference mode (validation runs eagerly), no CUDA autocast (a mixed
    `trainer.precision` caches casts across calls, which a capture cannot hold)."""
    return (
        tensor.is_cuda
        and torch.is_grad_enabled()
        and not torch.is_inference_mode_enabled()
        and not torch.is_autocast_enabled("cuda")
    )
