"""
layermux C++ engine (see engine/__init__.py for the Python facade)
"""
from __future__ import annotations
import collections.abc
import numpy
import numpy.typing
import typing
__all__: list[str] = ['CapacityError', 'CopyTrace', 'Engine', 'EngineConfig', 'EngineEvent', 'EngineHealth', 'EngineStats', 'ErrorCode', 'EventKind', 'Eviction', 'FinishReason', 'InvalidRequestError', 'LayermuxError', 'LedgerSnapshot', 'MIN_SLOTS', 'MatmulPrecision', 'ModelFileError', 'ModelFootprint', 'ModelInfo', 'ModelLoadOptions', 'ModelPlacement', 'OwnerUsage', 'ResidencyMode', 'ResidencyStats', 'SamplingParams', 'StepTrace', 'Trace', 'UnsupportedModelError', 'WaitTrace', 'dequantize', 'kernels_isa', 'plan_slots', 'read_bandwidth_gbs', 'trace_now_us', 'vulkan_validation_messages']
class LayermuxError(Exception):
    pass
class ModelFileError(LayermuxError):
    pass
class UnsupportedModelError(LayermuxError):
    pass
class InvalidRequestError(LayermuxError, ValueError):
    pass
class CapacityError(LayermuxError):
    pass
class Eviction:
    """
    Which streamed layer a slot gives up: next use farthest (belady) or least recent (lru)
    
    Members:
    
      belady
    
      lru
    """
    __members__: typing.ClassVar[dict[str, Eviction]]
    belady: typing.ClassVar[Eviction]
    lru: typing.ClassVar[Eviction]
    @typing.overload
    def __eq__(self, other: Eviction) -> bool:
        ...
    @typing.overload
    def __eq__(self, other: typing.Any) -> bool:
        ...
    def __getstate__(self) -> int:
        ...
    def __hash__(self) -> int:
        ...
    def __index__(self) -> int:
        ...
    def __init__(self, value: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def __int__(self) -> int:
        ...
    @typing.overload
    def __ne__(self, other: Eviction) -> bool:
        ...
    @typing.overload
    def __ne__(self, other: typing.Any) -> bool:
        ...
    def __repr__(self) -> str:
        ...
    def __setstate__(self, state: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def __str__(self) -> str:
        ...
    @property
    def name(self) -> str:
        ...
    @property
    def value(self) -> int:
        ...
class MatmulPrecision:
    """
    exact: bitwise the same tokens on every CPU; fast: bf16 / int8 dot products where the CPU has them (not bitwise)
    
    Members:
    
      exact
    
      fast
    """
    __members__: typing.ClassVar[dict[str, MatmulPrecision]]
    exact: typing.ClassVar[MatmulPrecision]
    fast: typing.ClassVar[MatmulPrecision]
    @typing.overload
    def __eq__(self, other: MatmulPrecision) -> bool:
        ...
    @typing.overload
    def __eq__(self, other: typing.Any) -> bool:
        ...
    def __getstate__(self) -> int:
        ...
    def __hash__(self) -> int:
        ...
    def __index__(self) -> int:
        ...
    def __init__(self, value: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def __int__(self) -> int:
        ...
    @typing.overload
    def __ne__(self, other: MatmulPrecision) -> bool:
        ...
    @typing.overload
    def __ne__(self, other: typing.Any) -> bool:
        ...
    def __repr__(self) -> str:
        ...
    def __setstate__(self, state: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def __str__(self) -> str:
        ...
    @property
    def name(self) -> str:
        ...
    @property
    def value(self) -> int:
        ...
class ResidencyMode:
    """
    auto: resident when it fits next to the KV reserve, else streamed; swap: whole-model swapping (the benchmark baseline)
    
    Members:
    
      auto
    
      resident
    
      streamed
    
      swap
    """
    __members__: typing.ClassVar[dict[str, ResidencyMode]]
    auto: typing.ClassVar[ResidencyMode]
    resident: typing.ClassVar[ResidencyMode]
    streamed: typing.ClassVar[ResidencyMode]
    swap: typing.ClassVar[ResidencyMode]
    @typing.overload
    def __eq__(self, other: ResidencyMode) -> bool:
        ...
    @typing.overload
    def __eq__(self, other: typing.Any) -> bool:
        ...
    def __getstate__(self) -> int:
        ...
    def __hash__(self) -> int:
        ...
    def __index__(self) -> int:
        ...
    def __init__(self, value: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def __int__(self) -> int:
        ...
    @typing.overload
    def __ne__(self, other: ResidencyMode) -> bool:
        ...
    @typing.overload
    def __ne__(self, other: typing.Any) -> bool:
        ...
    def __repr__(self) -> str:
        ...
    def __setstate__(self, state: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def __str__(self) -> str:
        ...
    @property
    def name(self) -> str:
        ...
    @property
    def value(self) -> int:
        ...
class EventKind:
    """
    Members:
    
      token
    
      done
    
      error
    """
    __members__: typing.ClassVar[dict[str, EventKind]]
    done: typing.ClassVar[EventKind]
    error: typing.ClassVar[EventKind]
    token: typing.ClassVar[EventKind]
    @typing.overload
    def __eq__(self, other: EventKind) -> bool:
        ...
    @typing.overload
    def __eq__(self, other: typing.Any) -> bool:
        ...
    def __getstate__(self) -> int:
        ...
    def __hash__(self) -> int:
        ...
    def __index__(self) -> int:
        ...
    def __init__(self, value: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def __int__(self) -> int:
        ...
    @typing.overload
    def __ne__(self, other: EventKind) -> bool:
        ...
    @typing.overload
    def __ne__(self, other: typing.Any) -> bool:
        ...
    def __repr__(self) -> str:
        ...
    def __setstate__(self, state: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def __str__(self) -> str:
        ...
    @property
    def name(self) -> str:
        ...
    @property
    def value(self) -> int:
        ...
class FinishReason:
    """
    Why a request ended (done events); none on the others
    
    Members:
    
      none
    
      stop
    
      length
    
      cancelled
    """
    __members__: typing.ClassVar[dict[str, FinishReason]]
    cancelled: typing.ClassVar[FinishReason]
    length: typing.ClassVar[FinishReason]
    none: typing.ClassVar[FinishReason]
    stop: typing.ClassVar[FinishReason]
    @typing.overload
    def __eq__(self, other: FinishReason) -> bool:
        ...
    @typing.overload
    def __eq__(self, other: typing.Any) -> bool:
        ...
    def __getstate__(self) -> int:
        ...
    def __hash__(self) -> int:
        ...
    def __index__(self) -> int:
        ...
    def __init__(self, value: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def __int__(self) -> int:
        ...
    @typing.overload
    def __ne__(self, other: FinishReason) -> bool:
        ...
    @typing.overload
    def __ne__(self, other: typing.Any) -> bool:
        ...
    def __repr__(self) -> str:
        ...
    def __setstate__(self, state: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def __str__(self) -> str:
        ...
    @property
    def name(self) -> str:
        ...
    @property
    def value(self) -> int:
        ...
class ErrorCode:
    """
    Why a request failed (error events); none on the others
    
    Members:
    
      none
    
      kv_exceeds_budget
    
      model_unloaded
    
      engine_failure
    
      shutdown
    """
    __members__: typing.ClassVar[dict[str, ErrorCode]]
    engine_failure: typing.ClassVar[ErrorCode]
    kv_exceeds_budget: typing.ClassVar[ErrorCode]
    model_unloaded: typing.ClassVar[ErrorCode]
    none: typing.ClassVar[ErrorCode]
    shutdown: typing.ClassVar[ErrorCode]
    @typing.overload
    def __eq__(self, other: ErrorCode) -> bool:
        ...
    @typing.overload
    def __eq__(self, other: typing.Any) -> bool:
        ...
    def __getstate__(self) -> int:
        ...
    def __hash__(self) -> int:
        ...
    def __index__(self) -> int:
        ...
    def __init__(self, value: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def __int__(self) -> int:
        ...
    @typing.overload
    def __ne__(self, other: ErrorCode) -> bool:
        ...
    @typing.overload
    def __ne__(self, other: typing.Any) -> bool:
        ...
    def __repr__(self) -> str:
        ...
    def __setstate__(self, state: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def __str__(self) -> str:
        ...
    @property
    def name(self) -> str:
        ...
    @property
    def value(self) -> int:
        ...
class EngineConfig:
    """
    Device budget and engine knobs (engine.h)
    """
    device_kind: str
    eviction: Eviction
    kv_dtype: str
    matmul_precision: MatmulPrecision
    def __init__(self, *, budget_bytes: typing.SupportsInt | typing.SupportsIndex = 2147483648, cap_fraction: typing.SupportsFloat | typing.SupportsIndex = 0.9, n_threads: typing.SupportsInt | typing.SupportsIndex = 0, prefetch_depth: typing.SupportsInt | typing.SupportsIndex = 2, eviction: Eviction = Eviction.belady, kv_block_tokens: typing.SupportsInt | typing.SupportsIndex = 16, max_batch_tokens: typing.SupportsInt | typing.SupportsIndex = 512, max_seqs_per_step: typing.SupportsInt | typing.SupportsIndex = 64, kv_reserve_fraction: typing.SupportsFloat | typing.SupportsIndex = 0.25, matmul_precision: MatmulPrecision = MatmulPrecision.exact, device_kind: str = 'cpu', device_index: typing.SupportsInt | typing.SupportsIndex = 0, link_gbps: typing.SupportsFloat | typing.SupportsIndex = 0.0, kv_dtype: str = 'f16', max_turn_steps: typing.SupportsInt | typing.SupportsIndex = 32, max_wait_ms: typing.SupportsFloat | typing.SupportsIndex = 2000.0, first_token_ms: typing.SupportsFloat | typing.SupportsIndex = 30.0) -> None:
        ...
    def __repr__(self) -> str:
        ...
    @property
    def budget_bytes(self) -> int:
        ...
    @budget_bytes.setter
    def budget_bytes(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def cap_fraction(self) -> float:
        ...
    @cap_fraction.setter
    def cap_fraction(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
    @property
    def device_index(self) -> int:
        ...
    @device_index.setter
    def device_index(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def first_token_ms(self) -> float:
        ...
    @first_token_ms.setter
    def first_token_ms(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
    @property
    def kv_block_tokens(self) -> int:
        ...
    @kv_block_tokens.setter
    def kv_block_tokens(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def kv_reserve_fraction(self) -> float:
        ...
    @kv_reserve_fraction.setter
    def kv_reserve_fraction(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
    @property
    def link_gbps(self) -> float:
        ...
    @link_gbps.setter
    def link_gbps(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
    @property
    def max_batch_tokens(self) -> int:
        ...
    @max_batch_tokens.setter
    def max_batch_tokens(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def max_seqs_per_step(self) -> int:
        ...
    @max_seqs_per_step.setter
    def max_seqs_per_step(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def max_turn_steps(self) -> int:
        ...
    @max_turn_steps.setter
    def max_turn_steps(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def max_wait_ms(self) -> float:
        ...
    @max_wait_ms.setter
    def max_wait_ms(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
    @property
    def n_threads(self) -> int:
        ...
    @n_threads.setter
    def n_threads(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def prefetch_depth(self) -> int:
        ...
    @prefetch_depth.setter
    def prefetch_depth(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
class SamplingParams:
    """
    One request's sampling (sampler.h); temperature 0 = greedy
    """
    ignore_eos: bool
    def __init__(self, *, temperature: typing.SupportsFloat | typing.SupportsIndex = 1.0, top_k: typing.SupportsInt | typing.SupportsIndex = 0, top_p: typing.SupportsFloat | typing.SupportsIndex = 1.0, min_p: typing.SupportsFloat | typing.SupportsIndex = 0.0, repetition_penalty: typing.SupportsFloat | typing.SupportsIndex = 1.0, presence_penalty: typing.SupportsFloat | typing.SupportsIndex = 0.0, frequency_penalty: typing.SupportsFloat | typing.SupportsIndex = 0.0, seed: typing.SupportsInt | typing.SupportsIndex = 0, max_tokens: typing.SupportsInt | typing.SupportsIndex = 16, stop_token_ids: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex] = [], ignore_eos: bool = False) -> None:
        ...
    def __repr__(self) -> str:
        ...
    @property
    def frequency_penalty(self) -> float:
        ...
    @frequency_penalty.setter
    def frequency_penalty(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
    @property
    def max_tokens(self) -> int:
        ...
    @max_tokens.setter
    def max_tokens(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def min_p(self) -> float:
        ...
    @min_p.setter
    def min_p(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
    @property
    def presence_penalty(self) -> float:
        ...
    @presence_penalty.setter
    def presence_penalty(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
    @property
    def repetition_penalty(self) -> float:
        ...
    @repetition_penalty.setter
    def repetition_penalty(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
    @property
    def seed(self) -> int:
        ...
    @seed.setter
    def seed(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def stop_token_ids(self) -> list[int]:
        ...
    @stop_token_ids.setter
    def stop_token_ids(self, arg0: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex]) -> None:
        ...
    @property
    def temperature(self) -> float:
        ...
    @temperature.setter
    def temperature(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
    @property
    def top_k(self) -> int:
        ...
    @top_k.setter
    def top_k(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def top_p(self) -> float:
        ...
    @top_p.setter
    def top_p(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
class ModelLoadOptions:
    """
    How one model is loaded (engine.h)
    """
    residency: ResidencyMode
    def __init__(self, *, residency: ResidencyMode = ResidencyMode.auto, sched_weight: typing.SupportsFloat | typing.SupportsIndex = 1.0, max_running: typing.SupportsInt | typing.SupportsIndex = 32, stream_slots: typing.SupportsInt | typing.SupportsIndex = 0) -> None:
        ...
    def __repr__(self) -> str:
        ...
    @property
    def max_running(self) -> int:
        ...
    @max_running.setter
    def max_running(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def sched_weight(self) -> float:
        ...
    @sched_weight.setter
    def sched_weight(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
    @property
    def stream_slots(self) -> int:
        ...
    @stream_slots.setter
    def stream_slots(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
class ModelFootprint:
    """
    A model's device bytes per residency choice (footprint.h)
    """
    def __init__(self, *, n_layer: typing.SupportsInt | typing.SupportsIndex, head_bytes: typing.SupportsInt | typing.SupportsIndex, layer_bytes: typing.SupportsInt | typing.SupportsIndex, workspace_bytes: typing.SupportsInt | typing.SupportsIndex = 0, kv_bytes_per_token: typing.SupportsInt | typing.SupportsIndex = 0, kv_block_bytes: typing.SupportsInt | typing.SupportsIndex = 0, kv_block_tokens: typing.SupportsInt | typing.SupportsIndex = 0) -> None:
        """
        A footprint given by its numbers (what-if planning, tests); engines compute real ones
        """
    def __repr__(self) -> str:
        ...
    def device_bytes(self, n_slots: typing.SupportsInt | typing.SupportsIndex) -> int:
        """
        Weights with n_slots layer slots (>= n_layer: resident), plus the workspace
        """
    @property
    def head_bytes(self) -> int:
        ...
    @property
    def kv_block_bytes(self) -> int:
        ...
    @property
    def kv_block_tokens(self) -> int:
        ...
    @property
    def kv_bytes_per_token(self) -> int:
        ...
    @property
    def layer_bytes(self) -> int:
        ...
    @property
    def matrix_format(self) -> str:
        ...
    @property
    def n_layer(self) -> int:
        ...
    @property
    def weight_bytes(self) -> int:
        ...
    @property
    def weights(self) -> str:
        ...
    @property
    def workspace_bytes(self) -> int:
        ...
class ModelPlacement:
    """
    One model's place in a residency plan
    """
    def __repr__(self) -> str:
        ...
    @property
    def device_bytes(self) -> int:
        ...
    @property
    def n_slots(self) -> int:
        ...
    @property
    def name(self) -> str:
        ...
    @property
    def residency(self) -> ResidencyMode:
        ...
class ModelInfo:
    """
    A loaded model (engine.h)
    """
    def __repr__(self) -> str:
        ...
    @property
    def device_weight_bytes(self) -> int:
        ...
    @property
    def eos_token_ids(self) -> list[int]:
        ...
    @property
    def footprint(self) -> ModelFootprint:
        ...
    @property
    def id(self) -> int:
        """
        the engine's number for the model (the step trace names models by it)
        """
    @property
    def matrix_format(self) -> str:
        ...
    @property
    def max_running(self) -> int:
        ...
    @property
    def n_ctx(self) -> int:
        ...
    @property
    def n_layer(self) -> int:
        ...
    @property
    def n_requests(self) -> int:
        ...
    @property
    def n_slots(self) -> int:
        ...
    @property
    def n_units_loaded(self) -> int:
        ...
    @property
    def n_vocab(self) -> int:
        ...
    @property
    def name(self) -> str:
        ...
    @property
    def resident(self) -> bool:
        ...
    @property
    def sched_weight(self) -> float:
        ...
    @property
    def weight_bytes(self) -> int:
        ...
    @property
    def weights(self) -> str:
        ...
    @property
    def workspace_bytes(self) -> int:
        ...
class EngineEvent:
    """
    One token, or the one terminal event (done / error) of a request
    """
    def __repr__(self) -> str:
        ...
    @property
    def decode_ms(self) -> float:
        ...
    @property
    def error_code(self) -> ErrorCode:
        ...
    @property
    def finish_reason(self) -> FinishReason:
        ...
    @property
    def index(self) -> int:
        """
        generation index of token_id
        """
    @property
    def kind(self) -> EventKind:
        ...
    @property
    def message(self) -> str:
        ...
    @property
    def n_preempted(self) -> int:
        ...
    @property
    def prefill_ms(self) -> float:
        ...
    @property
    def prompt_tokens(self) -> int:
        ...
    @property
    def req_id(self) -> int:
        ...
    @property
    def token_id(self) -> int:
        ...
class OwnerUsage:
    """
    One model's bookings, and the KV it could ever hold
    """
    @property
    def kv_bytes(self) -> int:
        ...
    @property
    def kv_capacity_blocks(self) -> int:
        ...
    @property
    def kv_capacity_tokens(self) -> int:
        ...
    @property
    def total_bytes(self) -> int:
        ...
    @property
    def weights_bytes(self) -> int:
        ...
    @property
    def workspace_bytes(self) -> int:
        ...
class LedgerSnapshot:
    """
    The ledger's figures at one moment (ledger.h)
    """
    @property
    def budget_bytes(self) -> int:
        ...
    @property
    def cap_bytes(self) -> int:
        ...
    @property
    def headroom_bytes(self) -> int:
        ...
    @property
    def kv_capacity_bytes(self) -> int:
        ...
    @property
    def models(self) -> dict[str, OwnerUsage]:
        ...
    @property
    def n_denied(self) -> int:
        ...
    @property
    def peak_bytes(self) -> int:
        ...
    @property
    def used_bytes(self) -> int:
        ...
class ResidencyStats:
    @property
    def bytes_copied(self) -> int:
        ...
    @property
    def copy_ms(self) -> float:
        ...
    @property
    def copy_wait_ms(self) -> float:
        ...
    @property
    def n_hits(self) -> int:
        ...
    @property
    def n_loads(self) -> int:
        ...
    @property
    def n_misses(self) -> int:
        ...
class EngineStats:
    @property
    def n_borrow_turns(self) -> int:
        ...
    @property
    def n_preemptions(self) -> int:
        ...
    @property
    def n_steps(self) -> int:
        ...
    @property
    def n_tokens_computed(self) -> int:
        ...
    @property
    def n_tokens_generated(self) -> int:
        ...
    @property
    def n_turns(self) -> int:
        ...
    @property
    def residency(self) -> ResidencyStats:
        ...
    @property
    def step_ms_total(self) -> float:
        ...
class StepTrace:
    """
    One engine step, as the trace recorded it (trace.h); times in steady-clock us
    """
    @property
    def borrowed(self) -> bool:
        """
        adaptive turns: it ran on slots borrowed from other models
        """
    @property
    def bytes_copied(self) -> int:
        ...
    @property
    def copy_wait_us(self) -> int:
        """
        time this step blocked on copies (a GPU: as the device measured it)
        """
    @property
    def end_us(self) -> int:
        ...
    @property
    def index(self) -> int:
        """
        steps the engine ran before this one
        """
    @property
    def model(self) -> int:
        """
        the model's id (ModelInfo.id)
        """
    @property
    def n_generated(self) -> int:
        """
        tokens sampled
        """
    @property
    def n_seqs(self) -> int:
        ...
    @property
    def n_tokens(self) -> int:
        """
        tokens computed: prefill chunks and decode tokens
        """
    @property
    def n_units_copied(self) -> int:
        """
        units whose copy landed since the previous step ended, any model's
        """
    @property
    def new_turn(self) -> bool:
        """
        the first step of a scheduler turn
        """
    @property
    def start_us(self) -> int:
        ...
class CopyTrace:
    """
    One copy into device memory: a layer, or a whole-model swap-in (unit -1)
    """
    @property
    def end_us(self) -> int:
        ...
    @property
    def model(self) -> int:
        ...
    @property
    def n_bytes(self) -> int:
        ...
    @property
    def n_units(self) -> int:
        ...
    @property
    def start_us(self) -> int:
        ...
    @property
    def unit(self) -> int:
        ...
class WaitTrace:
    """
    One time compute blocked on a copy (unit -1: a whole-model swap)
    """
    @property
    def end_us(self) -> int:
        ...
    @property
    def model(self) -> int:
        ...
    @property
    def start_us(self) -> int:
        ...
    @property
    def unit(self) -> int:
        ...
class Trace:
    """
    What the step trace recorded since it was enabled or last taken
    """
    @property
    def copies(self) -> list[CopyTrace]:
        ...
    @property
    def n_dropped(self) -> int:
        """
        records dropped because a ring was full
        """
    @property
    def steps(self) -> list[StepTrace]:
        ...
    @property
    def waits(self) -> list[WaitTrace]:
        ...
class EngineHealth:
    """
    Liveness of the step thread (engine.h)
    """
    @property
    def busy(self) -> bool:
        ...
    @property
    def device_fault(self) -> str:
        ...
    @property
    def n_loops(self) -> int:
        ...
    @property
    def since_loop_s(self) -> float:
        ...
class Engine:
    def __init__(self, config: EngineConfig) -> None:
        ...
    def cancel(self, req_id: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def config(self) -> EngineConfig:
        ...
    def debug_stall(self, on: bool) -> None:
        """
        Test hook: block (True) or release the step thread
        """
    def device_summary(self) -> str:
        """
        the device's kind; for a GPU its name, driver, heap
        """
    def drain_events(self) -> list[EngineEvent]:
        ...
    def event_fd(self) -> int:
        ...
    def footprint(self, spec: dict[str, typing.Any]) -> ModelFootprint:
        """
        What the model would cost here, from its file headers alone (nothing is loaded)
        """
    def health(self) -> EngineHealth:
        ...
    def kv_bytes_for(self, model: str, n_tokens: typing.SupportsInt | typing.SupportsIndex) -> int:
        ...
    def ledger(self) -> LedgerSnapshot:
        ...
    def load_model(self, spec: dict[str, typing.Any], options: ModelLoadOptions, progress: collections.abc.Callable[[int, int], None] | None = None) -> ModelInfo:
        ...
    def models(self) -> list[ModelInfo]:
        ...
    def n_threads(self) -> int:
        ...
    def plan_residency(self, specs: collections.abc.Sequence[dict[str, typing.Any]]) -> list[ModelPlacement] | None:
        """
        One equal-share plan for the models, against the headroom now; None when their minimums do not fit
        """
    def shutdown(self) -> None:
        ...
    def stats(self) -> EngineStats:
        ...
    def submit(self, req_id: typing.SupportsInt | typing.SupportsIndex, model: str, prompt: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], params: SamplingParams, capture_logits: bool = False) -> None:
        ...
    def take_logits(self, req_id: typing.SupportsInt | typing.SupportsIndex) -> numpy.typing.NDArray[numpy.float32]:
        ...
    def trace_enable(self, capacity: typing.SupportsInt | typing.SupportsIndex) -> None:
        """
        Record the step trace, keeping at most capacity steps, copies and waits each (0: stop); discards what was recorded
        """
    def trace_take(self) -> Trace:
        """
        What the trace recorded since enabled or last taken; empties it
        """
    def unload_model(self, name: str) -> None:
        ...
def dequantize(format: str, data: bytes, n: typing.SupportsInt | typing.SupportsIndex) -> numpy.typing.NDArray[numpy.float32]:
    """
    One row of a weight format dequantised to float32
    """
def kernels_isa() -> str:
    """
    SIMD path chosen for this CPU
    """
def plan_slots(models: collections.abc.Mapping[str, ModelFootprint], cap_bytes: typing.SupportsInt | typing.SupportsIndex, kv_room_bytes: typing.SupportsInt | typing.SupportsIndex, min_slots: typing.SupportsInt | typing.SupportsIndex = 2) -> dict[str, int] | None:
    """
    The equal-share plan (footprint.h): layer slots per model (n_layer = resident), or None when the minimums plus kv_room_bytes do not fit cap_bytes
    """
def read_bandwidth_gbs(n_bytes: typing.SupportsInt | typing.SupportsIndex = 1073741824, n_threads: typing.SupportsInt | typing.SupportsIndex = 0, repeats: typing.SupportsInt | typing.SupportsIndex = 5) -> float:
    """
    Best streaming-read GB/s over n_threads (0 = one per core), laid out as the device arena is
    """
def trace_now_us() -> int:
    """
    The step trace's clock now: steady-clock microseconds (Engine.trace_take)
    """
def vulkan_validation_messages() -> int:
    """
    Vulkan validation-layer messages seen by this process (LMX_VK_VALIDATION=1); tests fail on any
    """
MIN_SLOTS: int = 2
