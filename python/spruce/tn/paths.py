"""Contraction paths: the linear path format and cost model of opt_einsum, found in Rust.

A path lists one step per contraction; each step names positions in the current operand list,
those operands are removed and their contraction is appended. A step over the index set ``I``
joining ``k`` operands costs ``prod(size(I)) * (max(1, k - 1) + [an index is summed away])``; a
path's cost (``opt_cost``) is the sum over its steps and ``naive_cost`` is the cost of one step
over every operand, so the numbers compare one to one with ``opt_einsum.contract_path``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .. import _core
from ..errors import ArgumentError

__all__ = ["contract_path", "PathInfo", "ContractionStep", "OPTIMIZERS"]

#: The optimizers ``optimize=`` accepts (besides an explicit path).
OPTIMIZERS = ("auto", "optimal", "dp", "greedy", "random-greedy", "hyper")
_ALIASES = {"dynamic-programming": "dp", "random-greedy-128": "random-greedy"}
# random-greedy trials per native call when progress is shown
_CHUNK = 8


@dataclass(frozen=True)
class ContractionStep:
    """One step of a path: positions, the step as an einsum equation, what it costs."""

    positions: tuple[int, ...]
    einsum: str
    removed: str
    cost: int
    scale: int
    size: int


class PathInfo:
    """What a path costs, step by step (the fields of opt_einsum's ``PathInfo``).

    Attributes: ``path``, ``eq``, ``input_subscripts``, ``output_subscript``, ``indices``,
    ``size_dict``, ``shapes``, ``opt_cost``, ``naive_cost``, ``speedup``,
    ``largest_intermediate`` (ints, exact at any size; ``speedup`` a float), ``steps`` (a list of
    :class:`ContractionStep`), ``scale_list``, ``size_list``, ``optimizer`` (the optimizer that
    produced the path, with the reason if it fell back to greedy) and ``best_trial`` (for
    random-greedy and hyper).
    """

    def __init__(self, raw: dict[str, Any]):
        self.path: list[tuple[int, ...]] = list(raw["path"])
        self.input_subscripts: str = raw["input_subscripts"]
        self.output_subscript: str = raw["output_subscript"]
        self.eq = f"{self.input_subscripts}->{self.output_subscript}"
        self._symbols: str = raw["symbols"]
        self._sizes: list[int] = raw["sizes"]
        self._size_dict: dict[str, int] | None = None
        self.opt_cost: int = raw["opt_cost"]
        self.naive_cost: int = raw["naive_cost"]
        try:
            self.speedup: float = self.naive_cost / max(self.opt_cost, 1)
        except OverflowError:  # beyond float range
            self.speedup = float("inf")
        self.largest_intermediate: int = raw["largest_intermediate"]
        self.optimizer: str = raw["optimizer"]
        self.best_trial: int | None = raw["best_trial"]
        self._steps_raw: dict[str, list[Any]] | None = None
        self._steps: list[ContractionStep] | None = None

    # Derived fields are computed on first use: on networks of hundreds of tensors building them
    # costs a noticeable fraction of a greedy search.

    @property
    def size_dict(self) -> dict[str, int]:
        if self._size_dict is None:
            self._size_dict = dict(zip(self._symbols, self._sizes, strict=True))
        return self._size_dict

    @property
    def indices(self) -> frozenset[str]:
        return frozenset(self.input_subscripts.replace(",", ""))

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        sizes = self.size_dict
        return [tuple(sizes[c] for c in term) for term in self.input_subscripts.split(",")]

    def _columns(self) -> dict[str, list[Any]]:
        # The step report is built by the native layer on first use, from the expanded
        # equation and the index sizes (the network the path was found for).
        if self._steps_raw is None:
            self._steps_raw = _core.contract_path_steps(
                self.eq, [list(s) for s in self.shapes], self.path
            )
        return self._steps_raw

    @property
    def steps(self) -> list[ContractionStep]:
        if self._steps is None:
            r = self._columns()
            self._steps = [
                ContractionStep(p, e, rm, int(c), s, int(z))
                for p, e, rm, c, s, z in zip(
                    r["positions"],
                    r["einsum"],
                    r["removed"],
                    r["cost"],
                    r["scale"],
                    r["size"],
                    strict=True,
                )
            ]
        return self._steps

    @property
    def contraction_list(self) -> list[ContractionStep]:
        """Alias of :attr:`steps`."""
        return self.steps

    @property
    def scale_list(self) -> list[int]:
        return list(self._columns()["scale"])

    @property
    def size_list(self) -> list[int]:
        return [int(z) for z in self._columns()["size"]]

    def __repr__(self) -> str:
        lines = [
            f"  Complete contraction:  {self.eq}",
            f"         Naive scaling:  {len(self.indices)}",
            f"     Optimized scaling:  {max(self.scale_list, default=0)}",
            f"      Naive FLOP count:  {self.naive_cost:.3e}",
            f"  Optimized FLOP count:  {self.opt_cost:.3e}",
            f"   Theoretical speedup:  {self.speedup:.3e}",
            f"  Largest intermediate:  {self.largest_intermediate:.3e} elements",
            f"             Optimizer:  {self.optimizer}",
            "-" * 80,
            f"{'scaling':>7}  {'cost':>10}  current",
            "-" * 80,
        ]
        for s in self.steps[:50]:
            lines.append(f"{s.scale:>7}  {s.cost:>10.3e}  {s.einsum}")
        if len(self.steps) > 50:
            lines.append(f"... {len(self.steps) - 50} more steps")
        return "\n".join(lines)


def _shape_of(x: Any) -> list[int]:
    shape = getattr(x, "shape", None)
    if shape is None:
        raise ArgumentError(
            f"contract_path: operand of type {type(x).__name__} has no shape; "
            "pass arrays, or shapes with shapes=True"
        )
    return [int(d) for d in shape]


def _memory(memory_limit: Any) -> tuple[int | None, bool]:
    if memory_limit is None or (isinstance(memory_limit, int) and memory_limit == -1):
        return None, False
    if memory_limit == "max_input":
        return None, True
    if isinstance(memory_limit, bool) or not isinstance(memory_limit, (int, float)):
        raise ArgumentError(
            f"contract_path: memory_limit ({memory_limit!r}) must be None, -1, 'max_input' or "
            "a positive number of elements"
        )
    if memory_limit < 1:
        raise ArgumentError(
            f"contract_path: memory_limit ({memory_limit!r}) must be a positive number of elements"
        )
    # Beyond 2^127 elements no intermediate the search could form is excluded.
    return (int(memory_limit) if memory_limit < 2**127 else None), False


def contract_path(
    eq: str,
    *operands: Any,
    optimize: str | Sequence[Sequence[int]] = "auto",
    memory_limit: int | str | None = None,
    shapes: bool = False,
    time_limit: float | None = None,
    seed: int = 0,
    trials: int = 32,
    temperature: float = 1.0,
    subtree_size: int = 8,
    progress: bool | None = None,
) -> tuple[list[tuple[int, ...]], PathInfo]:
    """Finds a contraction order for ``eq`` without contracting anything.

    ``operands`` are tensors/arrays, or their shapes with ``shapes=True``. ``optimize`` is
    ``"optimal"`` (exhaustive, proven cheapest over pairwise paths; up to 20 operands),
    ``"dp"`` (exact among paths without outer products), ``"greedy"``, ``"random-greedy"``
    (``trials`` seeded trials, the first plain greedy, the cheapest kept), ``"hyper"`` (see
    below), ``"auto"`` (optimal up to 8 operands, the better of dp and greedy up to 12, greedy
    beyond) or an explicit path.
    ``memory_limit`` caps the elements of every intermediate (``"max_input"``: the largest
    operand); where no pairwise path fits, the path ends by contracting what is left in one step
    (``dp`` raises instead). ``time_limit`` (seconds) bounds the search: ``optimal`` and ``dp``
    then fall back to greedy (``info.optimizer`` says so), random-greedy stops starting trials.
    ``progress`` shows a progress bar for random-greedy (trials done, best cost) and a clock for
    hyper (seconds spent against ``time_limit``); default: on for 100+ operands.

    ``"hyper"`` is a hyper-optimizing search for large networks: each of ``trials`` trials runs
    random-greedy's trial of the same ``seed`` (``temperature``) and a greedy whose temperature,
    branching and cost weighting are drawn from ``(seed, trial)``, keeps the cheaper tree and
    improves it by subtree reconfiguration: subtrees of up to ``subtree_size`` parts (3 to 12;
    the exhaustive search grows as 3^parts) are replaced by their optimal contraction whenever
    that is strictly cheaper, until a pass improves nothing; the best tree is then reconfigured
    with subtrees two parts larger. Costs are exact and every step honours ``memory_limit``.
    Without ``time_limit`` the path is a pure function of the network, ``seed``, ``trials``,
    ``temperature``, ``subtree_size`` and ``memory_limit`` (on any thread count) and costs no
    more than ``"greedy"`` or ``"random-greedy"`` with the same ``seed``, ``trials`` and
    ``temperature``. ``time_limit`` is a budget: trials stop starting after 70% of it and
    reconfiguration stops at its end, so the result then depends on the machine's speed (set
    ``trials`` high to spend the whole budget). ``info.best_trial`` names the winning trial.

    Returns ``(path, info)`` in opt_einsum's linear format; ``info.opt_cost`` etc. are exact ints.

    >>> path, info = spruce.tn.contract_path("ij,jk,kl->il", (2, 2), (2, 5), (5, 2), shapes=True)
    >>> path, info.naive_cost, info.opt_cost
    ([(1, 2), (0, 1)], 120, 56)
    """
    if not isinstance(eq, str):
        raise ArgumentError(f"contract_path: eq ({eq!r}) must be an einsum equation string")
    shape_list: Sequence[Sequence[int]]
    if shapes:
        for s in operands:
            if hasattr(s, "shape"):
                raise ArgumentError(
                    "contract_path: shapes=True but an operand has a shape attribute (an array); "
                    "pass tuples of ints"
                )
        # Sequences of ints go to the native layer as given; anything else (e.g. floats or
        # iterables that are not sequences) is converted with int() below if it refuses them.
        shape_list = operands
    else:
        shape_list = [_shape_of(x) for x in operands]
    limit, max_input = _memory(memory_limit)
    if time_limit is not None:
        time_limit = float(time_limit)
    explicit = None
    if isinstance(optimize, str):
        name = _ALIASES.get(optimize.lower(), optimize.lower())
        if optimize.lower() == "random-greedy-128" and trials == 32:
            trials = 128
    elif isinstance(optimize, Sequence) and not isinstance(optimize, (bytes, bytearray)):
        name = "auto"
        try:
            explicit = [[int(i) for i in step] for step in optimize]
        except (TypeError, ValueError) as e:
            raise ArgumentError(
                f"contract_path: optimize ({optimize!r}) must be an optimizer name or a path "
                "(a sequence of tuples of ints)"
            ) from e
    else:
        raise ArgumentError(
            f"contract_path: optimize ({optimize!r}) must be one of {', '.join(OPTIMIZERS)} "
            "or a path"
        )
    if trials < 1:
        raise ArgumentError(f"contract_path: trials ({trials}) must be at least 1")
    if (
        isinstance(subtree_size, bool)
        or not isinstance(subtree_size, int)
        or not 3 <= subtree_size <= 12
    ):
        raise ArgumentError(
            f"contract_path: subtree_size ({subtree_size!r}) must be an int in [3, 12]"
        )

    def native(
        shape_arg: Sequence[Sequence[int]], first: int, count: int, tl: float | None
    ) -> dict:
        return _core.contract_path(
            eq,
            shape_arg,
            name,
            path=explicit,
            memory_limit=limit,
            max_input=max_input,
            time_limit=tl,
            trials=count,
            first_trial=first,
            seed=int(seed) & (2**64 - 1),
            temperature=float(temperature),
            subtree_size=subtree_size,
        )

    def call(first: int = 0, count: int = trials, tl: float | None = time_limit) -> dict:
        nonlocal shape_list
        try:
            return native(shape_list, first, count, tl)
        except (TypeError, OverflowError):
            if shape_list is not operands:
                raise
            shape_list = [[int(d) for d in s] for s in operands]
            return native(shape_list, first, count, tl)

    show = progress if progress is not None else len(shape_list) >= 100
    if name == "hyper" and explicit is None and show:
        info = _with_clock(lambda: PathInfo(call()), time_limit)
        return info.path, info
    if name != "random-greedy" or explicit is not None or not show or trials <= _CHUNK:
        info = PathInfo(call())
        return info.path, info

    import time

    from tqdm.auto import tqdm

    start = time.perf_counter()
    best: PathInfo | None = None
    with tqdm(total=trials, desc="random-greedy", unit="trial", disable=None) as bar:
        for first in range(0, trials, _CHUNK):
            left = None if time_limit is None else time_limit - (time.perf_counter() - start)
            if left is not None and left <= 0 and best is not None:
                break
            info = PathInfo(call(first, min(_CHUNK, trials - first), left))
            key = (info.opt_cost, info.largest_intermediate)
            if best is None or key < (best.opt_cost, best.largest_intermediate):
                best = info
            bar.update(min(_CHUNK, trials - first))
            bar.set_postfix(cost=f"{best.opt_cost:.3e}")
    assert best is not None
    return best.path, best


def _with_clock(run: Callable[[], PathInfo], budget: float | None) -> PathInfo:
    """Runs a native search (which releases the GIL) under a bar of the seconds spent, against
    ``budget`` when there is one."""
    import threading
    import time

    from tqdm.auto import tqdm

    done = threading.Event()
    with tqdm(total=budget, desc="hyper", unit="s", disable=None) as bar:

        def tick() -> None:
            last = time.perf_counter()
            while not done.wait(0.25):
                now = time.perf_counter()
                bar.update(round(now - last, 2))
                last = now

        clock = threading.Thread(target=tick, name="spruce-hyper-clock", daemon=True)
        clock.start()
        try:
            return run()
        finally:
            done.set()
            clock.join()
