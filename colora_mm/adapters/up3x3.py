"""The depthwise-style spatial branch's up-projection (3x3 conv ``r -> C``, ``groups=r``,
stride 1, padding 1), with a formulation chosen per device.

* CPU, float32 (not under autocast): a small C++ kernel (``csrc/up3x3.cpp``) that forms
  each output channel as nine shifted multiply-adds over its flattened plane, and whose
  backward produces the input and the weight gradient from one read of the output
  gradient. PyTorch's grouped convolution (oneDNN) computes the two gradients in
  separate passes; the kernel takes about half its forward + backward time at the
  shapes of CoLoRAConvNeXt (``benchmarks/bench_colora.py --only spatial``).
* Where the output is added to another convolution's (the spatial branch): the same
  kernel adds it there in place, training and inference alike (:func:`up3x3_add_`).
  The extension also holds the range filter's inference kernel (:func:`range_filter`,
  one call per feature map instead of about fifteen PyTorch ops) and one side of a
  CoLoRA pair's factors as one autograd node (:func:`pair_side_factors`,
  ``csrc/pair_factors.cpp``; :mod:`.colora_pair`), or as the node's forward and
  backward without a node, for a layer's low-rank op to run as part of its own
  (:class:`PairSideRebuild`).
* Anything else (CUDA, other dtypes, autocast, TorchScript tracing, torch.compile,
  fake or meta tensors, an active ``TorchDispatchMode`` such as an operator counter):
  ``torch.nn.functional.conv2d`` with ``groups=r``, as ``nn.Conv2d`` runs it.

Both compute the same sums in another order (float32 rounding apart: about 1e-7
relative). The kernel is compiled with ``torch.utils.cpp_extension`` by
``tools/setup_env.sh`` or else on first use (30-70 s, a C++ compiler and ``ninja``
needed; cached per source, torch version and CPU in
``$COLORA_MM_EXT_DIR``, default ``~/.cache/colora_mm/extensions``). Where it cannot be
built, the grouped convolution runs, with one warning naming the reason.

``COLORA_MM_UP3X3=conv`` (environment) always runs the grouped convolution, the
filter's PyTorch formulation and the pair factors' Python formulation; ``auto`` (the
default) picks per call as above.
"""
from __future__ import annotations

import hashlib
import logging
import os
import os.path as osp
import platform
import sysconfig
import threading
import warnings
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .lowrank import Factors, FactorRebuild, autocast_dtype, compiling

ENV_CHOICE = 'COLORA_MM_UP3X3'
ENV_DIR = 'COLORA_MM_EXT_DIR'
CHOICES = ('auto', 'conv')
SOURCE = osp.join(osp.dirname(osp.abspath(__file__)), 'csrc', 'up3x3.cpp')
#: Built into the same extension: one side of a CoLoRA pair as one autograd node
#: (:mod:`.colora_pair`).
SOURCES = (SOURCE, osp.join(osp.dirname(SOURCE), 'pair_factors.cpp'))
CFLAGS = ['-O3', '-march=native', '-fopenmp']
if platform.machine().lower() in ('x86_64', 'amd64'):
    # 256-bit vectors: 6% faster than 512-bit ones on an AVX-512 AMD EPYC (the nine
    # shifted loads per tap row cross fewer cache lines)
    CFLAGS.append('-mprefer-vector-width=256')

_lock = threading.Lock()
_state: dict = {}          # 'module' once built, 'error' once it failed


def choice() -> str:
    """``COLORA_MM_UP3X3``: ``'auto'`` (default) or ``'conv'``."""
    value = os.environ.get(ENV_CHOICE, 'auto').strip().lower() or 'auto'
    if value not in CHOICES:
        raise ValueError(f'{ENV_CHOICE}={os.environ[ENV_CHOICE]!r}: expected one of '
                         f'{", ".join(CHOICES)} (auto: the C++ kernel on the CPU for '
                         'float32, the grouped convolution elsewhere; conv: always the '
                         'grouped convolution)')
    return value


def _build_signature() -> str:
    """What the compiled code depends on besides its source: the CPU's instruction set
    (the kernel is built with -march=native), torch's version and installation (its
    headers and libraries: the build's command line names them, and a build made
    against another environment's would be rebuilt on every switch), Python's headers,
    the compiler flags."""
    flags = ''
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith(('flags', 'Features')):
                    flags = line
                    break
    except OSError:
        pass
    return '|'.join([platform.machine(), flags, torch.__version__,
                     osp.dirname(osp.abspath(torch.__file__)),
                     sysconfig.get_paths().get('include', ''), ' '.join(CFLAGS)])


def stage_sources(path: str, sources: Sequence[str]) -> List[str]:
    """Copies of ``sources`` in the build directory ``path``, each written only where
    it is missing or differs (atomically, so a process reading it never sees half a
    file). The build then names the same files from every copy of the package (another
    clone, an installed one): ninja finds the build current instead of rebuilding
    whenever a copy elsewhere built it last, which a changed source path on its
    command line would make it do."""
    staged = []
    for src in sources:
        with open(src, 'rb') as f:
            data = f.read()
        dst = osp.join(path, osp.basename(src))
        try:
            with open(dst, 'rb') as f:
                same = f.read() == data
        except OSError:
            same = False
        if not same:
            tmp = f'{dst}.{os.getpid()}.{threading.get_ident()}.tmp'
            with open(tmp, 'wb') as f:
                f.write(data)
            os.replace(tmp, dst)
        staged.append(dst)
    return staged


def build_dir() -> str:
    return os.environ.get(ENV_DIR) or osp.join(osp.expanduser('~'), '.cache', 'colora_mm',
                                               'extensions')


def load_kernel() -> Optional[object]:
    """The compiled kernel, built on first call; None (after one warning) where it
    cannot be built."""
    if 'module' in _state or 'error' in _state:
        return _state.get('module')
    with _lock:
        if 'module' in _state or 'error' in _state:
            return _state.get('module')
        try:
            source = b''
            for src in SOURCES:
                with open(src, 'rb') as f:
                    source += f.read()
            digest = hashlib.sha1(source + _build_signature().encode()).hexdigest()[:12]
            name = f'colora_mm_up3x3_{digest}'
            path = osp.join(build_dir(), name)
            os.makedirs(path, exist_ok=True)
            # on a machine without CUDA, importing cpp_extension logs a warning about
            # CUDA_HOME that has nothing to do with this CPU kernel
            logger = logging.getLogger('torch.utils.cpp_extension')
            level = logger.level
            logger.setLevel(logging.ERROR)
            try:
                from torch.utils.cpp_extension import load
            finally:
                logger.setLevel(level)
            _state['module'] = load(name, stage_sources(path, SOURCES), extra_cflags=CFLAGS,
                                    extra_ldflags=['-fopenmp'], build_directory=path,
                                    verbose=False)
        except Exception as err:       # no compiler, no ninja, a failed build
            reason = str(err).strip().splitlines()
            _state['error'] = f'{type(err).__name__}: {reason[0] if reason else ""}'
            warnings.warn(f'colora_mm: the CPU kernels (up-projection, inference filter, '
                          f'pair factors; {", ".join(SOURCES)}) could not be built '
                          f'({_state["error"]}); PyTorch ops run instead (same results; '
                          'the spatial branch\'s up-projection takes about twice the time '
                          'of forward + backward). It needs a C++ compiler and ninja '
                          f'(pip install ninja); {ENV_CHOICE}=conv skips it.',
                          stacklevel=2)
    return _state.get('module')


def _apply_kernel(kernel, z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The kernel's autograd op (forward and backward in C++; no second derivative)."""
    return kernel.up3x3(z, weight)


def _apply_add_kernel(kernel, out: torch.Tensor, z: torch.Tensor,
                      weight: torch.Tensor) -> torch.Tensor:
    """The kernel's in-place autograd op ``out += up(z)``."""
    return kernel.up3x3_add_(out, z, weight)


def _tracing_or_intercepted(*tensors: torch.Tensor) -> bool:
    """Under TorchScript tracing, torch.compile, a ``TorchDispatchMode`` (fake tensors,
    operator counters such as ``tools/analysis/param_flops.py``'s) or on tensor
    subclasses the opaque kernel would be invisible or cannot run: the convolution
    runs, as those tools expect."""
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    if compiling():
        return True
    if _get_current_dispatch_mode() is not None:
        return True
    return any(type(t) not in (torch.Tensor, nn.Parameter) or t.is_meta for t in tensors)


def kernel_applies(z: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``conv2d(z, weight, padding=1, groups=z.shape[1])`` can take the C++
    kernel here (before building it)."""
    if _tracing_or_intercepted(z, weight):
        return False
    return (z.device.type == 'cpu' and weight.device.type == 'cpu'
            and z.dtype == torch.float32 and weight.dtype == torch.float32
            and z.dim() == 4 and tuple(weight.shape[1:]) == (1, 3, 3)
            and weight.shape[0] % z.shape[1] == 0
            and autocast_dtype('cpu') is None)


def up3x3(z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``conv2d(z, weight, padding=1, groups=r)`` for ``z (N, r, H, W)`` and ``weight
    (C, 1, 3, 3)``, by the formulation for this device (module docstring)."""
    if choice() == 'auto' and kernel_applies(z, weight):
        kernel = load_kernel()
        if kernel is not None:
            return _apply_kernel(kernel, z, weight)
    return F.conv2d(z, weight, None, 1, 1, 1, z.shape[1])


def up3x3_add_(out: torch.Tensor, z: torch.Tensor, weight: torch.Tensor) -> bool:
    """``out += conv2d(z, weight, padding=1, groups=r)`` in place, by the C++ kernel, as
    one autograd op, where it applies (:func:`kernel_applies`; ``out`` a contiguous
    float32 CPU tensor of the output's shape, not a leaf that requires a gradient): the
    branch's output goes straight into the tensor it is added to, without a tensor of
    its own or a separate sum. Returns False, ``out`` untouched, anywhere else."""
    if choice() != 'auto' or not kernel_applies(z, weight) or _tracing_or_intercepted(out):
        return False
    if (out.device.type != 'cpu' or out.dtype != torch.float32 or not out.is_contiguous()
            or tuple(out.shape) != (z.shape[0], weight.shape[0]) + tuple(z.shape[2:])
            or (out.requires_grad and out.grad_fn is None)):
        return False
    kernel = load_kernel()
    if kernel is None:
        return False
    _apply_add_kernel(kernel, out, z, weight)
    return True


def range_filter(z: torch.Tensor, kernel1d: torch.Tensor, eps: float) -> Optional[torch.Tensor]:
    """The range-kernel filter (Eq. 11, separable Gaussian ``kernel1d``) of ``z (N, C,
    H, W)`` by the C++ kernel, one call, where it applies: CPU, float32, contiguous, no
    gradient needed (inference), not traced or intercepted, ``COLORA_MM_UP3X3`` not
    ``conv``. None anywhere else (the caller runs the PyTorch formulation)."""
    if choice() != 'auto' or _tracing_or_intercepted(z, kernel1d):
        return None
    if (z.device.type != 'cpu' or z.dtype != torch.float32 or z.dim() != 4
            or not z.is_contiguous() or kernel1d.dtype != torch.float32
            or kernel1d.device.type != 'cpu'):
        return None
    if torch.is_grad_enabled() and z.requires_grad:
        return None
    kernel = load_kernel()
    if kernel is None:
        return None
    return kernel.range_filter(z, kernel1d.contiguous(), float(eps))


def pair_side_kernel_applies(A: torch.Tensor, B: torch.Tensor, As: torch.Tensor,
                             Bs: torch.Tensor, base: torch.Tensor, left: torch.Tensor,
                             right: torch.Tensor) -> bool:
    """Whether :func:`pair_side_factors` runs its C++ node for these tensors (see there)."""
    tensors = (A, B, As, Bs, base, left, right)
    if choice() != 'auto' or _tracing_or_intercepted(*tensors):
        return False
    if A.dtype not in (torch.float32, torch.float64) or any(
            t.device.type != 'cpu' or t.dtype != A.dtype or t.dim() != 2 for t in tensors):
        return False
    if base.requires_grad or left.requires_grad or right.requires_grad:
        return False
    return load_kernel() is not None


class PairSideRebuild(FactorRebuild):
    """The rebuild of one side's factors formed without an autograd node
    (:func:`pair_side_factors` with ``fused=True``): a low-rank op that takes it
    (:mod:`.lowrank`) takes the side's parameters :attr:`grad_inputs` (``A, B, As,
    Bs``) as its own inputs, forms the factors again in its backward pass
    (:meth:`backward_factors`, which keeps the partner product ``C`` it formed) and
    turns their gradients into the parameters' with :meth:`input_grads` (the C++
    node's closed form). :meth:`tracked` gives the factors as the C++ node instead, for
    any other use."""

    __slots__ = ('_kernel', 'index', 'scalars', 'k', '_formed_from', '_product')

    def __init__(self, kernel, index: int, tensors: tuple, scalars: list, k: tuple,
                 where: str = '') -> None:
        s0, s1 = scalars[4], scalars[5]

        def form(*args):
            return kernel.pair_side_rebuild(index, *args, s0, s1, None)[:2]

        def form_graph(*args):
            return kernel.pair_side_factors(index, *args, *k)[:2]

        super().__init__(form, tensors, form_graph, where=where)
        self._kernel, self.index, self.scalars, self.k = kernel, index, scalars, k
        self._formed_from = self._product = None

    @property
    def grad_inputs(self) -> tuple:
        """The side's parameters (``A, B, As, Bs``), the op's inputs with a gradient."""
        return self.tensors[:4]

    def tracked(self) -> Factors:
        """The factors as the C++ autograd node forms them (a low-rank op of another
        kind, the weight path): the same values, with their autograd history."""
        return pair_side_factors(self.index, *self.tensors, *self.k, where=self.where)

    def backward_factors(self, tensors: tuple,
                         dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        if torch.is_grad_enabled():        # a backward pass that records a graph
            return super().backward_factors(tensors, dtype)
        left, right, product = self._kernel.pair_side_rebuild(
            self.index, *tensors, self.scalars[4], self.scalars[5], None)
        self._formed_from, self._product = tensors, product
        if self.on_rebuilt is not None:
            self.on_rebuilt(left, right)
        self._tensors = None
        return left.to(dtype), right.to(dtype)

    def input_grads(self, grad_left: Optional[torch.Tensor],
                    grad_right: Optional[torch.Tensor]) -> tuple:
        """The gradients of :attr:`grad_inputs` from those of ``(L, R)``, after
        :meth:`backward_factors` in the same backward pass; it then drops what it kept."""
        tensors, product = self._formed_from, self._product
        self._formed_from = self._product = None
        if grad_left is None and grad_right is None:
            return (None,) * 4
        if tensors is None:
            raise RuntimeError(f'{self.where or "CoLoRA pair"}: the gradients of a fused '
                               'pair side need its factors formed in the same backward '
                               'pass first.')
        dtype = tensors[0].dtype
        grad_left = None if grad_left is None else grad_left.to(dtype)
        grad_right = None if grad_right is None else grad_right.to(dtype)
        return tuple(self._kernel.pair_side_grads(self.index, *tensors, product, grad_left,
                                                  grad_right, self.scalars))


#: Whether :func:`pair_side_factors` forms a side without its autograd node where the
#: caller asks for it (``fused=True``); False gives the node everywhere.
FUSE_PAIR_SIDES = True


def pair_side_factors(index: int, A: torch.Tensor, B: torch.Tensor, As: torch.Tensor,
                      Bs: torch.Tensor, base: torch.Tensor, left: torch.Tensor,
                      right: torch.Tensor, k_ind: float,
                      k_sh: float, where: str = '', fused: bool = False) -> Optional[Factors]:
    """One side of a CoLoRA pair, ``(L, R)`` (:meth:`.colora_pair.CoLoRAPair.factors`),
    as one C++ autograd node (``csrc/pair_factors.cpp``), where it applies: every tensor
    a 2-D CPU tensor of one dtype, float32 or float64; the partner's base weight and
    offset without a gradient; not traced or intercepted; ``COLORA_MM_UP3X3`` not
    ``conv``. None anywhere else (the caller runs the Python formulation).

    The factors come as :class:`.lowrank.Factors` with a rebuild that forms them again,
    bit for bit, from the node's inputs (the parameters, the partner's base weight and
    offset: alive anyway) and the two scalings: a low-rank op then keeps none of ``L``,
    ``R`` and the partner product ``C`` from forward to backward, and the node keeps
    only its inputs. The rebuild, run in that op's backward pass, leaves the ``C`` it
    formed for the node's backward pass, which runs next, so that ``C`` is formed once
    more per step, not twice. ``where`` names the pair in its errors.

    ``fused=True`` (for a layer whose low-rank op takes it): the factors come without
    autograd history, with a :class:`PairSideRebuild`: the op takes the parameters as
    its inputs and the side is one autograd node with the layer, not two."""
    if not pair_side_kernel_applies(A, B, As, Bs, base, left, right):
        return None
    kernel = load_kernel()
    k_ind, k_sh = float(k_ind), float(k_sh)
    if fused and FUSE_PAIR_SIDES:
        tensors = (A, B, As, Bs, base, left, right)
        left_factor, right_factor, scalars = kernel.pair_side_forward(index, *tensors,
                                                                      k_ind, k_sh)
        return Factors(left_factor, right_factor,
                       PairSideRebuild(kernel, index, tensors, scalars, (k_ind, k_sh),
                                       where=where))
    left_factor, right_factor, slot, scalings = kernel.pair_side_factors(
        index, A, B, As, Bs, base, left, right, k_ind, k_sh)
    s0, s1 = scalings.tolist()

    def form(A, B, As, Bs, base, left, right):
        L, R, _ = kernel.pair_side_rebuild(index, A, B, As, Bs, base, left, right, s0,
                                           s1, slot)
        return L, R

    def form_graph(A, B, As, Bs, base, left, right):
        L, R, _, _ = kernel.pair_side_factors(index, A, B, As, Bs, base, left, right,
                                              k_ind, k_sh)
        return L, R

    rebuild = FactorRebuild(form, (A, B, As, Bs, base, left, right), form_graph,
                            where=where)
    return Factors(left_factor, right_factor, rebuild)


class GroupedUp3x3(nn.Conv2d):
    """``nn.Conv2d(r, C, 3, padding=1, groups=r, bias=False)`` (same parameters, same
    state dict) whose forward is :func:`up3x3`: the depthwise-style spatial branch's
    ``B``. Any other configuration (a stride, a bias), or an input that is not
    ``(N, r, H, W)``, runs as the plain ``nn.Conv2d`` (which names a wrong input).

    ``forward(z, into)`` adds the output into ``into`` in place where
    :func:`up3x3_add_` can, and then returns ``into`` itself; otherwise it returns the
    output (the caller adds it)."""

    def forward(self, z: torch.Tensor, into: Optional[torch.Tensor] = None) -> torch.Tensor:
        if (self.bias is None and self.groups == self.in_channels
                and self.padding_mode == 'zeros' and tuple(self.kernel_size) == (3, 3)
                and tuple(self.stride) == (1, 1) and tuple(self.padding) == (1, 1)
                and tuple(self.dilation) == (1, 1)
                and z.dim() == 4 and z.shape[1] == self.in_channels):
            if into is not None and up3x3_add_(into, z, self.weight):
                return into
            return up3x3(z, self.weight)
        return super().forward(z)
