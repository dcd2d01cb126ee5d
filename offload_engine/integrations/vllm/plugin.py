"""The vLLM side of the plugin: three patches on vLLM's CPU attention backend and model runner.

- ``CPUModelRunner.load_model``: after vLLM loads the model, ``Runtime.attach`` finds its attention
  layers, checks the configuration against the model (a predictor for another model, tensor
  parallelism, compilation) and raises ``ConfigError`` at start, before any request.
- ``CPUAttentionBackendImpl.do_kv_cache_update``: after vLLM writes a token's K/V into its block,
  the policy writes its own state for that token at the same slot (``paged.Scorer.write``).
- ``CPUAttentionBackendImpl.forward``: prefill rows go through vLLM's kernel untouched; decode rows
  (one query token) attend sinks + window + the policy's top tokens, per sequence, layer and KV
  head (``paged.sparse_decode_attention``). A batch that is all decode never runs vLLM's kernel.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch

from ...errors import ConfigError, TbrunError
from ...selection.selector import Selector
from . import paged
from .config import ENV_VAR, VllmPluginConfig

logger = logging.getLogger("vllm.tbrun")  # under vLLM's logger: printed with vLLM's own messages

RUNTIME: "Runtime | None" = None  # set in the worker process by the load_model patch
_CONFIG: VllmPluginConfig | None = None


class Runtime:
    """The plugin's state in one worker: the selector, the scorer and what it knows of the model."""

    def __init__(self, config: VllmPluginConfig, scorer: paged.Scorer, selector: Selector, num_layers: int):
        self.config, self.scorer, self.selector, self.num_layers = config, scorer, selector, num_layers
        self.dense = scorer.dense_layers(num_layers)
        self.hidden: dict[int, torch.Tensor] = {}  # producer layer -> its attention input [T, E] this step
        self.keys_transposed: bool | None = None  # vLLM CPU's key block layout, found at the first write
        self.enabled = True  # False: vLLM's own attention (policy state is still written; tests, benchmarks)
        # Layers and steps that attend every token use vLLM's kernel, except under policy=dense, whose
        # purpose is to run the plugin's own paged attention over every token (the exactness reference).
        self.own_dense_attention = config.base == "dense"
        # Benchmarks: {block size: [attended tokens, distinct blocks touched]} of the selecting layers
        self.block_coverage: dict[int, list[int]] | None = None
        self.reuse = paged.SelectionReuse(config.selection.interval)
        self.decode_steps = 0  # decode forward passes that went through the plugin
        self.selecting_steps = 0  # ... of which some sequence attended fewer than all its tokens

    def set_selection(self, selection) -> None:
        """Another budget / sinks / window / interval for the same policy (tests and benchmarks)."""
        self.config = replace(self.config, selection=selection)
        self.selector = Selector(selection, capacity=self.selector.capacity, dense_layers=self.dense)
        self.reuse = paged.SelectionReuse(selection.interval)

    # -- set-up ------------------------------------------------------------------------------------
    @classmethod
    def attach(cls, model: torch.nn.Module, vllm_config, config: VllmPluginConfig) -> "Runtime":
        from vllm.config import CompilationMode
        from vllm.model_executor.layers.attention import Attention
        from vllm.model_executor.models.utils import extract_layer_index

        refuse_unsupported_setup(vllm_config)
        layers = {extract_layer_index(m.layer_name): (name, m) for name, m in model.named_modules() if isinstance(m, Attention)}
        if not layers:
            raise ConfigError(f"{ENV_VAR}: the model has no attention layers the tbrun plugin can select for.")
        for index, (name, module) in layers.items():
            impl = module.impl
            if impl.sliding_window not in (-1, None) or impl.alibi_slopes is not None or impl.logits_soft_cap or impl.sinks is not None:
                raise ConfigError(f"{ENV_VAR}: layer {name} uses sliding windows, ALiBi, soft-capping or attention sinks, "
                                  "which the tbrun plugin does not handle yet; unset it for this model.")
            if getattr(impl, "kv_cache_dtype", "auto") != "auto":
                raise ConfigError(f"{ENV_VAR}: kv_cache_dtype={impl.kv_cache_dtype} stores quantised K/V the tbrun plugin "
                                  f"cannot read; leave kv_cache_dtype at auto, or unset {ENV_VAR}.")
        parents = {index: model.get_submodule(name.rsplit(".", 1)[0]) for index, (name, _) in layers.items()}
        first = layers[min(layers)][1].impl
        hf = vllm_config.model_config.hf_text_config
        if config.needs_hidden_states and vllm_config.compilation_config.mode != CompilationMode.NONE:
            raise ConfigError(f"{ENV_VAR}: policy={config.policy} reads each layer's attention input, which needs eager "
                              "mode: pass enforce_eager=True to vllm.LLM (vllm serve --enforce-eager).")
        runtime_ref: list[Runtime] = []
        scorer = build_scorer(config, vllm_config, hf, parents, first, lambda p, b: runtime_ref[0].hidden_rows(p, b))
        selector = Selector(config.selection, capacity=vllm_config.model_config.max_model_len,
                            dense_layers=scorer.dense_layers(len(layers)))
        runtime = cls(config, scorer, selector, len(layers))
        runtime_ref.append(runtime)
        if config.needs_hidden_states:
            runtime.record_hidden_states(parents, scorer.predictor.config.producers)
        logger.info("tbrun selection on (%s): %d layers, %d of them dense", config.describe(), len(layers), len(runtime.dense))
        return runtime

    def record_hidden_states(self, parents: dict[int, torch.nn.Module], producers) -> None:
        """A forward pre-hook on each producer's attention module keeps its input (no copy)."""
        for layer in producers:
            def keep(module, args, kwargs, layer=layer):
                self.hidden[layer] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[1]
            parents[layer].register_forward_pre_hook(keep, with_kwargs=True)

    def hidden_rows(self, producer: int, batch: paged.DecodeBatch) -> torch.Tensor:
        """The producer's attention input at the decode rows: ``[B, E]``."""
        return self.hidden[producer][batch.rows]

    # -- per step ------------------------------------------------------------------------------------
    def decode_batch(self, metadata, block_size: int) -> tuple[paged.DecodeBatch | None, bool]:
        """(the step's decode sequences or None, whether every request of the step is decode); cached per step."""
        cached = getattr(metadata, "_tbrun_batch", None)
        if cached is not None:
            return cached
        starts = metadata.query_start_loc
        requests = starts.shape[0] - 1
        one_token = (starts[1:] - starts[:-1]) == 1
        if not bool(one_token.any()):
            result = (None, False)
        else:
            which = one_token.nonzero().flatten()
            batch = paged.decode_batch(starts[which].long(), metadata.seq_lens[:requests][which].long(),
                                       metadata.block_table[:requests][which], block_size, self.selector)
            result = (batch, bool(one_token.all()))
            self.decode_steps += 1
            self.selecting_steps += not batch.all_fit
        self.reuse.next_step()  # every forward pass, prefill-only ones too: a kept selection is one step old or unused
        metadata._tbrun_batch = result
        return result

    def attends_everything(self, layer: int, batch: paged.DecodeBatch) -> bool:
        """Whether every decode sequence attends all its tokens at ``layer`` (so vLLM's kernel can run it)."""
        return not self.own_dense_attention and (layer in self.dense or batch.all_fit)

    def attend(self, layer: int, impl, query: torch.Tensor, kv_cache: torch.Tensor, batch: paged.DecodeBatch) -> torch.Tensor:
        """Decode rows' attention output ``[B, H, D]`` over sinks + window + selection."""
        key_cache, value_cache = split_cache(kv_cache)
        kv_heads = key_cache.shape[1]
        rows = query[batch.rows]  # [B, H, D]
        if layer in self.dense or batch.all_fit:
            positions = paged.every_position(batch, kv_heads)
        else:
            if batch.most == 0:  # every sequence's share is still below the floor: sinks and window, nothing scored
                selected = batch.fixed.new_empty(batch.fixed.shape[0], kv_heads, 0)
            else:
                selected = self.reuse.select(layer, batch, lambda part: paged.select_top(
                    self.scorer.score(layer, query[part.rows], part), part).expand(-1, kv_heads, -1))
            positions = paged.attended_positions(batch, selected)
            if self.block_coverage is not None:
                for size, counts in self.block_coverage.items():
                    tokens, blocks = paged.blocks_touched(positions, size)
                    counts[0] += tokens
                    counts[1] += blocks
        return paged.sparse_decode_attention(rows, key_cache, value_cache, batch, positions, impl.scale,
                                             keys_transposed=bool(self.keys_transposed))


def refuse_unsupported_setup(vllm_config) -> None:
    """Engine set-ups the plugin cannot select in, refused before the first request: several workers
    (each sees only its share of the heads or layers) and speculative decoding (the drafter's attention
    layers run through the same backend, with layer numbers of their own)."""
    parallel = vllm_config.parallel_config
    if parallel.tensor_parallel_size > 1 or getattr(parallel, "pipeline_parallel_size", 1) > 1:
        raise ConfigError(f"{ENV_VAR}: tensor and pipeline parallelism are not supported by the tbrun plugin yet; "
                          f"unset {ENV_VAR} or use one worker.")
    if getattr(vllm_config, "speculative_config", None) is not None:
        raise ConfigError(f"{ENV_VAR}: speculative decoding is not supported by the tbrun plugin (the draft model's "
                          f"layers would go through its selection); drop speculative_config or unset {ENV_VAR}.")


def split_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM CPU's ``[blocks, KvH, bs, 2D]`` -> key, value caches ``[blocks, KvH, bs, D]`` (views)."""
    blocks, kv_heads, block_size, _ = kv_cache.shape
    return kv_cache.view(blocks, kv_heads, block_size * 2, -1).chunk(2, dim=2)


def build_scorer(config: VllmPluginConfig, vllm_config, hf, parents, impl, hidden) -> paged.Scorer:
    """The scorer for ``config.base`` (wrapped by CriticalKV if asked)."""
    if config.base == "dense":
        scorer: paged.Scorer = paged.DenseScorer()
    elif config.base == "streaming":
        scorer = paged.StreamingScorer()
    elif config.base == "quest":
        scorer = paged.QuestScorer(scale=impl.scale)
    else:
        scorer = paged.TokenButlerScorer(load_predictor(config, vllm_config, hf, len(parents)), hidden)
    if config.critical:
        def output_projection(layer: int, heads=impl.num_heads, dim=impl.head_size) -> torch.Tensor:
            weight = parents[layer].o_proj.weight  # [E, H * D]
            return weight.view(weight.shape[0], heads, dim).permute(1, 2, 0)  # [H, D, E]
        if not all(hasattr(p, "o_proj") for p in parents.values()):
            raise ConfigError(f"{ENV_VAR}: critical(...) needs each attention module's o_proj; this model has none.")
        scorer = paged.CriticalScorer(scorer, output_projection)
    return scorer


def load_predictor(config: VllmPluginConfig, vllm_config, hf, num_layers: int):
    """The TokenButler predictor for this model (``predictor=`` or the one shipped for it), shape-checked."""
    from ...models import ModelDims
    from ...policies.tokenbutler import SHIPPED, shipped_predictor_named
    from ...predictor.checkpoint import load_checkpoint

    path = config.predictor
    if path is None:
        shipped = shipped_predictor_named(str(vllm_config.model_config.model), config.selection.interval,
                                          vllm_config.model_config.max_model_len)
        if shipped is None:
            raise ConfigError(f"{ENV_VAR}: policy={config.policy} needs a predictor for {vllm_config.model_config.model}: add "
                              f"predictor=DIR (train one with `tbrun train-predictor`); shipped predictors exist for: {', '.join(SHIPPED)}.")
        path = str(shipped)
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    dims = ModelDims(num_layers=num_layers, num_heads=hf.num_attention_heads, num_kv_heads=hf.num_key_value_heads,
                     head_dim=head_dim, hidden_size=hf.hidden_size, max_positions=vllm_config.model_config.max_model_len,
                     vocab_size=hf.vocab_size)
    try:
        predictor, _ = load_checkpoint(path, dims)
    except TbrunError as exc:
        raise ConfigError(f"{ENV_VAR}: {exc}") from None
    return predictor.to(vllm_config.model_config.dtype).eval()


# -- patches ----------------------------------------------------------------------------------------
def install(config: VllmPluginConfig) -> None:
    """Patch vLLM's CPU backend and model runner (idempotent; vLLM loads plugins in every process)."""
    global _CONFIG
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    _CONFIG = config
    if getattr(CPUAttentionBackendImpl, "_tbrun_patched", False):
        return
    original_forward = CPUAttentionBackendImpl.forward
    original_update = CPUAttentionBackendImpl.do_kv_cache_update
    original_load = CPUModelRunner.load_model

    def load_model(self, *args, **kwargs):
        global RUNTIME
        original_load(self, *args, **kwargs)
        RUNTIME = Runtime.attach(self.model, self.vllm_config, _CONFIG)

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
        original_update(self, layer, key, value, kv_cache, slot_mapping)
        if RUNTIME is None or self.attn_type != "decoder":
            return
        slots = slot_mapping.long()
        written = slots >= 0
        count = slots.shape[0]
        key, value, slots = key[:count][written], value[:count][written], slots[written]
        if slots.numel() == 0:
            return
        if RUNTIME.keys_transposed is None:
            RUNTIME.keys_transposed = key_layout(kv_cache, key, slots)
        index = layer_index(layer)
        RUNTIME.scorer.write(index, key, value, slots, kv_cache.shape[0] * kv_cache.shape[2])

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        if RUNTIME is None or not RUNTIME.enabled or attn_metadata is None or self.attn_type != "decoder" or kv_cache.numel() == 0:
            return original_forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        batch, all_decode = RUNTIME.decode_batch(attn_metadata, kv_cache.shape[2])
        if batch is None or RUNTIME.attends_everything(layer_index(layer), batch):
            return original_forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        if not all_decode:  # prefill rows by vLLM's kernel; the decode rows are overwritten below
            original_forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        output[batch.rows] = RUNTIME.attend(layer_index(layer), self, query, kv_cache, batch).to(output.dtype)
        return output

    CPUAttentionBackendImpl.forward = forward
    CPUAttentionBackendImpl.do_kv_cache_update = do_kv_cache_update
    CPUModelRunner.load_model = load_model
    CPUAttentionBackendImpl._tbrun_patched = True


def layer_index(layer) -> int:
    index = getattr(layer, "_tbrun_index", None)
    if index is None:
        from vllm.model_executor.models.utils import extract_layer_index

        index = layer._tbrun_index = extract_layer_index(layer.layer_name)
    return index


def key_layout(kv_cache: torch.Tensor, key: torch.Tensor, slots: torch.Tensor) -> bool:
    """Whether vLLM stored the key blocks as ``[D, bs]`` (its "vec" kernels) rather than ``[bs, D]``.

    Found by reading back the first written key; a layout neither (an ISA that packs keys, e.g.
    AMX tiles) stops with a message instead of attending garbage.
    """
    key_cache, _ = split_cache(kv_cache)
    block_size = key_cache.shape[2]
    slot = int(slots[0])
    block, offset = slot // block_size, slot % block_size
    want = key[0].to(key_cache.dtype)
    if torch.equal(paged.dim_major(key_cache)[block, :, :, offset], want):
        return True
    if torch.equal(key_cache[block, :, offset], want):
        return False
    raise RuntimeError(f"{ENV_VAR}: this vLLM build stores keys in a layout the tbrun plugin cannot read "
                       "(packed for its ISA kernel); unset TBRUN_VLLM or report the vLLM version and CPU.")
