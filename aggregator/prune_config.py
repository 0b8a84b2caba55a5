"""``pruning:`` in the aggregator's config, and the ``--prune SPEC`` text that writes it.

SPEC is ``KIND:TARGET[@START-END][,SCOPE]``; TARGET is a weight sparsity. ``structured:0.5``
zeroes half the model's weights by removing whole hidden units (26 of each 64 in the digits
MLP), ``unstructured:0.9@1-20,global`` 90 % of the weights ranked over all layers, reached
at version 20 along the cubic schedule (``aggregator.pruning``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedge.errors import ConfigError

__all__ = ["PruningConfig"]


class PruningConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["structured", "unstructured"] = Field(
        description="structured: whole hidden units / output channels; unstructured: weights"
    )
    target: float = Field(gt=0, lt=1, description="final weight sparsity (structured: by units)")
    start_round: int = Field(default=1, ge=1, description="first version that is pruned")
    end_round: int = Field(default=10, ge=1, description="version that reaches the target")
    scope: Literal["layer", "global"] = Field(
        default="layer", description="rank per layer (each loses the target) or over all layers"
    )

    @model_validator(mode="after")
    def _span(self) -> PruningConfig:
        if self.end_round <= self.start_round:
            raise ValueError(
                f"pruning end_round ({self.end_round}) must exceed start_round ({self.start_round})"
            )
        return self

    @classmethod
    def parse(cls, spec: str, rounds: int) -> PruningConfig:
        """From ``--prune SPEC``; without ``@START-END`` pruning runs from version 1 to
        two thirds of ``rounds`` (the rest fine-tunes under the final mask)."""
        text = spec.strip()
        head, _, scope = text.partition(",")
        kind, _, rest = head.partition(":")
        target, _, span = rest.partition("@")
        try:
            if span:
                lo, hi = (int(v) for v in span.split("-"))
            else:
                lo, hi = 1, max(2, (2 * rounds) // 3)
            return cls.model_validate(
                {
                    "kind": kind,
                    "target": float(target),
                    "start_round": lo,
                    "end_round": hi,
                    **({"scope": scope} if scope else {}),
                }
            )
        except ValueError as e:
            raise ConfigError(
                f"--prune {spec!r}: expected KIND:TARGET[@START-END][,SCOPE] with KIND "
                f"structured or unstructured, 0 < TARGET < 1, SCOPE layer or global "
                f"(e.g. structured:0.5): {str(e).splitlines()[0]}"
            ) from None
