"""What every config section shares: strictness (unknown keys, inf and nan refused) and the precision names."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

Precision = Literal["fp32", "fp16", "int8"]  # what a TensorRT engine can be built from
ExportPrecision = Literal["fp32", "fp16", "int8", "int8_cpu"]  # int8: for TensorRT; int8_cpu: for ORT on x86


class Section(BaseModel):
    # .inf / .nan would pass every bound below and surface epochs later as a nan loss
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
