"""How a job's processes divide the work: the ``parallel.*`` sizes as one value and their arithmetic.

A job of ``W`` processes is ``data_replicate x data_shard x context x tensor x pipeline`` ranks: data-parallel
ranks (replicas x shards) see different samples, context-parallel ranks split a sample's tokens, tensor-parallel
ranks split the layers' widths and heads, pipeline stages split the layers. ``data_shard = -1`` means "the rest of
the world": ``W / (data_replicate x context x tensor x pipeline)``. Which sizes an engine offers is the engine's
business (the ``fsdp2`` runtime has no pipeline, ``megatron`` no HSDP replicas); the arithmetic and its messages,
naming the ``parallel.*`` keys, are the same for both and for the checks made before launching a job.
"""

from __future__ import annotations

import math

import attrs

_WORLD_KEYS = ("data_replicate", "data_shard", "context", "tensor", "pipeline")


def _product(**sizes: int) -> str:
    terms = " * ".join(f"parallel.{key}={value}" for key, value in sizes.items())
    return f"{terms} = {math.prod(sizes.values())}" if len(sizes) > 1 else terms


@attrs.frozen(kw_only=True)
class ParallelLayout:
    """The ``parallel.*`` sizes of a job (``data_shard=-1``: inferred from the world size).

    Raises:
        ValueError: A size below 1 (``data_shard``: other than -1), naming every offending key.
    """

    data_replicate: int = 1
    """HSDP replicas (``parallel.data_replicate``)."""
    data_shard: int = -1
    """FSDP shards / data-parallel ranks (``parallel.data_shard``); ``-1``: the rest of the world."""
    context: int = 1
    """Context-parallel ranks (``parallel.context``)."""
    tensor: int = 1
    """Tensor-parallel ranks (``parallel.tensor``)."""
    pipeline: int = 1
    """Pipeline stages (``parallel.pipeline``)."""
    virtual_pipeline: int | None = None
    """Model chunks per pipeline rank (``parallel.virtual_pipeline``); ``None`` or 1: one."""

    def __attrs_post_init__(self) -> None:
        given = {"data_replicate": self.data_replicate, "context": self.context, "tensor": self.tensor}
        given["pipeline"] = self.pipeline
        invalid = [f"parallel.{key} must be >= 1, got {value}" for key, value in given.items() if value < 1]
        if self.data_shard != -1 and self.data_shard < 1:
            invalid.append(f"parallel.data_shard must be -1 (infer) or >= 1, got {self.data_shard}")
        if invalid:
            raise ValueError("invalid parallel sizes: " + "; ".join(invalid))

    @property
    def model_parallel(self) -> int:
        """Ranks that share one data-parallel coordinate: ``data_replicate x context x tensor x pipeline``."""
        return self.data_replicate * self.context * self.tensor * self.pipeline

    @property
    def dp(self) -> int:
        """Data-parallel ranks (``data_replicate x data_shard``; the layout must be resolved)."""
        assert self.data_shard != -1, "resolve the layout against the world size first"
        return self.data_replicate * self.data_shard

    @property
    def chunks(self) -> int:
        """Model chunks per pipeline rank (1 without a virtual pipeline)."""
        return self.virtual_pipeline or 1

    def ranks_needed(self) -> str:
        """The process counts this layout runs on, in words ("a multiple of 4", "8")."""
        rest = self.model_parallel
        return f"a multiple of {rest}" if self.data_shard == -1 else str(rest * self.data_shard)

    def fits(self, world: int) -> bool:
        """Whether ``world`` processes can run this layout."""
        rest = self.model_parallel
        return world % rest == 0 if self.data_shard == -1 else world == rest * self.data_shard

    def resolve(self, world: int) -> ParallelLayout:
        """This layout for ``world`` processes, ``data_shard`` inferred.

        Raises:
            ValueError: If ``world`` is not a multiple of the other sizes (inferring), or the sizes do not
                multiply to it, naming the keys and values.
        """
        if world < 1:
            raise ValueError(f"the world size must be >= 1, got {world}")
        sizes = {key: getattr(self, key) for key in _WORLD_KEYS if key != "data_shard"}
        shown = {k: v for k, v in sizes.items() if k != "pipeline" or v > 1}
        if self.data_shard == -1:
            if world % self.model_parallel:
                raise ValueError(
                    f"cannot infer parallel.data_shard: the world size {world} is not divisible by "
                    f"{_product(**shown)}; launch a multiple of {self.model_parallel} processes or change those sizes"
                )
            return attrs.evolve(self, data_shard=world // self.model_parallel)
        if not self.fits(world):
            everything = {key: getattr(self, key) for key in _WORLD_KEYS if key != "pipeline" or self.pipeline > 1}
            raise ValueError(
                f"the parallel layout does not match the world size: {_product(**everything)}, but {world} "
                f"processes were launched; choose sizes whose product is {world}, or set parallel.data_shard=-1 "
                "to infer it"
            )
        return self

    def model_problems(
        self, *, heads: int | None = None, hidden: int | None = None, ffn: int | None = None, layers: int | None = None
    ) -> list[str]:
        """What of the model's sizes the layout does not divide (``None``: not checked), one line each."""
        problems = []
        if heads is not None and heads % (self.tensor * self.context):
            problems.append(
                f"the model's {heads} attention heads are not divisible by "
                f"{_product(tensor=self.tensor, context=self.context)} (tensor parallelism splits the heads, then "
                "context parallelism splits each rank's heads again)"
            )
        for what, size in (("hidden size", hidden), ("feed-forward size", ffn)):
            if size is not None and size % self.tensor:
                problems.append(f"the model's {what} {size} is not divisible by parallel.tensor={self.tensor}")
        stages = self.pipeline * self.chunks
        if layers is not None and layers % stages:
            problems.append(
                f"the model's {layers} layers are not divisible by "
                f"{_product(pipeline=self.pipeline, virtual_pipeline=self.chunks)} (each model chunk runs as many)"
                if self.chunks > 1
                else f"the model's {layers} layers are not divisible by parallel.pipeline={self.pipeline}"
            )
        return problems

    def check_model(self, **sizes: int | None) -> None:
        """Raise ``ValueError`` listing :meth:`model_problems` (keywords ``heads``, ``hidden``, ``ffn``, ``layers``)."""
        problems = self.model_problems(**sizes)
        if problems:
            raise ValueError("the parallel layout does not fit the model: " + "; ".join(problems))
