"""bench.py — Mamba's linear scaling against attention's quadratic one, and where a Mamba LM wins against a Transformer.

    python bench.py                  scaling + models on the GPU: OUT/results.json, OUT/{scaling,models}.png, tables
    python bench.py --kernel         our Triton scan against the official CUDA kernel (../shared/anchors timings)
    python bench.py --quick          small sizes, runs on a CPU in under a minute
    python bench.py --selective-copying   why the scan is selective: a task the time-invariant scan cannot learn
    python bench.py --vision         only the vision section: OUT/vision.{json,png}
    python bench.py --models         only the language models (generation and models): OUT/models.{json,png}

Sections
  scaling     time of forward and forward+backward, and peak memory, against sequence length (batch 1): the selective
              scan (Triton kernel, parallel scan, reference loop) at d_inner 1536, d_state 16, against causal attention
              (naive, with the score matrix materialised, and PyTorch's scaled_dot_product_attention) at 12 heads × 64 —
              the two mixers of a d_model 768 block. Out-of-memory points are recorded as such; a method whose last
              point took longer than --max-seconds stops there. Slopes are fitted on log-log axes from --fit-from on.
  generation  a Mamba LM (d_model 768 × 24 layers) and a GPT-style Transformer (768 × 12 layers) of ~130M parameters,
              random weights, bf16: a prompt of 2048 tokens, then 128 new tokens; both decoders are captured in CUDA
              graphs (Transformer: static KV cache + SDPA; Mamba: its O(1) recurrent step). tokens/s = batch · 128 / time.
              In the JSON under models, as generation (and generation_long with 1024 new tokens).
  models      the same two models: prefill time against prompt length (constant tokens per call); decoding tokens/s
              against context length (each step a CUDA-graph replay; the Transformer's cache grows, Mamba's state does
              not); generation with 1024 new tokens too; training tokens/s against context (constant tokens per step);
              and Mamba's floors on this GPU — matrix products timed alone plus the scan for prefill, the bytes a
              step reads over the copy bandwidth for decoding — with its times as multiples of them.
  vision      inference of MambaVision-small and ViT-small (vision.py) at 32, 64, 128 and 224 px: images/s, peak
              memory, and the fitted growth of time with the image side from 64 px on.
  selective copying (--selective-copying, alone): the paper's section 4.1.1 task, 16 data tokens among 256, learned by
              a 2-layer Mamba LM with the selective scan and by the same model with a time-invariant one; token
              accuracy against training steps -> OUT/selective_copying.{json,png}.
  kernel      the anchors' four shapes: ours vs the official kernel, direct and normalised by SDPA timed in this run.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from mini_mamba.mamba import MambaConfig, MambaLM
from mini_mamba.scan import selective_scan
from mini_mamba.selective_copying import train_copying
from mini_mamba.training import bounded, fail, output_folder, peak_memory
from mini_mamba.vision import build_model

VOCAB = 50280                                   # GPT-NeoX's vocabulary, as the Mamba paper's language models

# ---------------------------------------------------------------------------------------------------------------------
# Measuring


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def time_ms(fn, device: torch.device) -> float:
    """Median milliseconds of fn(): triton's do_bench on a GPU, a few perf_counter runs on a CPU."""
    if device.type == "cuda":
        import triton
        return triton.testing.do_bench(fn, warmup=10, rep=50)
    fn()
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - start) * 1e3)
    return float(np.median(runs))


def guarded(run, device: torch.device) -> dict:
    """run() -> a dict of measurements, run with the GPU's peak-memory counter reset; {"oom": True} instead when it
    runs out of memory."""
    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        return run()
    except (torch.cuda.OutOfMemoryError, RuntimeError, MemoryError) as error:
        if not is_oom(error) and not isinstance(error, MemoryError):
            raise
        return dict(oom=True)
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def timed(run, device: torch.device) -> dict:
    """run()'s milliseconds (`ms`) and the peak memory (bytes) of one call."""
    run()
    peak = peak_memory(device)                      # before timing: do_bench allocates a buffer to flush the L2
    return dict(ms=time_ms(run, device), peak_bytes=peak)


def measure(make, device: torch.device) -> dict:
    """make() -> (forward, forward_backward) closures over allocated inputs. Returns their times (ms) and the peak
    memory (bytes) of forward+backward, or {"oom": True}."""
    def run():
        forward, forward_backward = make()
        both = timed(forward_backward, device)
        return dict(fwd_ms=time_ms(forward, device), fwd_bwd_ms=both["ms"], peak_bytes=both["peak_bytes"])
    return guarded(run, device)


def fitted_slope(points: list[dict], key: str, fit_from: int, x: str = "seqlen") -> float | None:
    """Slope of log(time or memory) against log(x: the sequence length) over the points from fit_from on."""
    xs = [(p[x], p[key]) for p in points if p.get(key) and p[x] >= fit_from]
    if len(xs) < 2:
        return None
    L, y = np.log([x[0] for x in xs]), np.log([x[1] for x in xs])
    return float(np.polyfit(L, y, 1)[0])


# ---------------------------------------------------------------------------------------------------------------------
# The two mixers at matched width


def scan_inputs(batch: int, d_inner: int, seqlen: int, d_state: int, device, dtype=torch.bfloat16) -> dict:
    """The anchors' inputs: bf16 sequences, fp32 parameters, per-step B and C, softplus, z gate."""
    def randn(*shape, dt=dtype):
        return torch.randn(*shape, device=device, dtype=dt)
    return dict(u=randn(batch, d_inner, seqlen), delta=0.5 * randn(batch, d_inner, seqlen),
                A=-torch.exp(0.5 * randn(d_inner, d_state, dt=torch.float32)), B=randn(batch, d_state, seqlen),
                C=randn(batch, d_state, seqlen), D=randn(d_inner, dt=torch.float32), z=randn(batch, d_inner, seqlen),
                delta_bias=torch.full((d_inner,), -2.0, device=device), delta_softplus=True)


def with_grads(inputs: dict) -> dict:
    return {k: v.requires_grad_(True) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def scan_maker(impl: str, batch: int, d_inner: int, seqlen: int, d_state: int, device, dtype,
               config: dict | None = None):
    """config: tile_config() overrides for the Triton kernel (impl 'triton' only)."""
    def scan(**inputs):
        if config is None:
            return selective_scan(**inputs, impl=impl)
        from mini_mamba.scan_triton import selective_scan_triton
        return selective_scan_triton(**inputs, config=config)

    def make():
        inputs = with_grads(scan_inputs(batch, d_inner, seqlen, d_state, device, dtype))
        dout = torch.randn_like(inputs["u"])

        def forward():
            with torch.no_grad():
                scan(**inputs)

        def forward_backward():
            for x in inputs.values():
                if isinstance(x, torch.Tensor):
                    x.grad = None
            scan(**inputs).backward(dout)
        return forward, forward_backward
    return make


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal softmax(q kᵀ/√d) v with the (seqlen × seqlen) score matrix materialised."""
    seqlen = q.shape[-2]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])                      # (b, heads, L, L)
    future = torch.ones(seqlen, seqlen, dtype=torch.bool, device=q.device).triu(1)
    return torch.softmax(scores.masked_fill(future, float("-inf")).float(), -1).to(q.dtype) @ v


def sdpa_attention(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def attention_maker(attention, batch: int, seqlen: int, device, dtype, heads: int = 12, head_dim: int = 64):
    def make():
        q, k, v = (torch.randn(batch, heads, seqlen, head_dim, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        dout = torch.randn_like(q)

        def forward():
            with torch.no_grad():
                attention(q, k, v)

        def forward_backward():
            for x in (q, k, v):
                x.grad = None
            attention(q, k, v).backward(dout)
        return forward, forward_backward
    return make


def scaling(args, device, dtype) -> dict:
    lengths = [args.min_len * 2 ** i for i in range(int(math.log2(args.max_len // args.min_len)) + 1)]
    methods = {
        "scan (Triton)": (lambda L: scan_maker("triton", 1, args.d_inner, L, 16, device, dtype), args.max_len),
        "scan (parallel)": (lambda L: scan_maker("parallel", 1, args.d_inner, L, 16, device, dtype), args.max_len),
        "scan (reference loop)": (lambda L: scan_maker("ref", 1, args.d_inner, L, 16, device, dtype), args.ref_max_len),
        "attention (naive)": (lambda L: attention_maker(naive_attention, 1, L, device, dtype), args.max_len),
        "attention (SDPA)": (lambda L: attention_maker(sdpa_attention, 1, L, device, dtype), args.max_len),
    }
    if device.type != "cuda":
        del methods["scan (Triton)"]                 # the interpreter is far too slow to time
    results = {}
    for name, (maker, max_len) in methods.items():
        points, stopped = [], None
        for L in tqdm([L for L in lengths if L <= max_len], desc=name, leave=False):
            if stopped:
                points.append(dict(seqlen=L, skipped=stopped))
                continue
            point = dict(seqlen=L, **measure(maker(L), device))
            points.append(point)
            if point.get("oom"):
                stopped = "out of memory at a shorter length"
            elif point["fwd_bwd_ms"] > 1e3 * args.max_seconds:
                stopped = f"forward+backward over {args.max_seconds} s at a shorter length"
        results[name] = dict(points=points, **{f"slope_{key}": fitted_slope(points, key, args.fit_from)
                                               for key in ("fwd_ms", "fwd_bwd_ms", "peak_bytes")})
    return results


# ---------------------------------------------------------------------------------------------------------------------
# Generation: a Transformer with a KV cache against Mamba's recurrent step


class GPT(nn.Module):
    """A GPT-2-style decoder (pre-norm, learned positions, tied head) with a static KV cache for decoding."""

    def __init__(self, vocab_size=50280, d_model=768, n_layers=12, heads=12, max_len=4096):
        super().__init__()
        self.heads, self.max_len = heads, max_len
        self.wte, self.wpe = nn.Embedding(vocab_size, d_model), nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            ln1=nn.LayerNorm(d_model), qkv=nn.Linear(d_model, 3 * d_model), proj=nn.Linear(d_model, d_model),
            ln2=nn.LayerNorm(d_model), mlp=nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                                         nn.Linear(4 * d_model, d_model)))) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.wte.weight

    def empty_cache(self, batch: int, device, dtype) -> torch.Tensor:
        d_head = self.wte.embedding_dim // self.heads                      # (layers, k|v, b, heads, max_len, d_head)
        return torch.zeros(len(self.blocks), 2, batch, self.heads, self.max_len, d_head, device=device, dtype=dtype)

    def forward(self, ids: torch.Tensor, cache: torch.Tensor | None = None, start: torch.Tensor | int = 0
                ) -> torch.Tensor:
        """ids (b, l) at positions start..start+l-1; their keys and values go into the cache (if any: training needs
        none); -> logits (b, l, V). A prompt (start = 0) attends causally within itself; a single token attends to the
        cache up to itself."""
        batch, seqlen = ids.shape
        positions = start + torch.arange(seqlen, device=ids.device)                        # (l,)
        x = self.wte(ids) + self.wpe(positions)
        for i, block in enumerate(self.blocks):
            q, k, v = (t.view(batch, seqlen, self.heads, -1).transpose(1, 2)
                       for t in block["qkv"](block["ln1"](x)).chunk(3, -1))           # (b, heads, l, d_head)
            if cache is not None:
                cache[i, 0].index_copy_(2, positions, k)
                cache[i, 1].index_copy_(2, positions, v)
            if seqlen > 1:                                                                 # the prompt
                att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:                                                                          # one new token
                visible = (torch.arange(self.max_len, device=ids.device) <= positions).view(1, 1, 1, -1)
                att = F.scaled_dot_product_attention(q, cache[i, 0], cache[i, 1], attn_mask=visible)
            x = x + block["proj"](att.transpose(1, 2).reshape(batch, seqlen, -1))
            x = x + block["mlp"](block["ln2"](x))
        return self.head(self.ln_f(x))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_generation(prefill, step, batch: int, new_tokens: int, device, use_graph: bool) -> dict:
    """prefill() -> the first new token (b,), resetting the model's state; step(token) -> the next token, updating
    the state in place. Times prefill + (new_tokens - 1) steps; the steps are CUDA-graph replays when use_graph."""
    def run():
        token = prefill().clone()                                   # `token` is the static input of the graph
        if use_graph:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):                           # warm up outside the graph, as capture requires
                token.copy_(step(token))
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                token.copy_(step(token))
            advance = graph.replay
        else:
            def advance():
                token.copy_(step(token))
        synchronize(device)
        start = time.perf_counter()
        token.copy_(prefill())
        synchronize(device)
        prefill_s = time.perf_counter() - start
        for _ in range(new_tokens - 1):
            advance()
        synchronize(device)
        seconds = time.perf_counter() - start
        return dict(tokens_per_s=batch * new_tokens / seconds, seconds=seconds, prefill_s=prefill_s,
                    peak_bytes=peak_memory(device))
    return guarded(run, device)


def mamba_decoder(lm: MambaLM, prompt: torch.Tensor):
    """(prefill, step) for time_generation: one parallel pass over the prompt, then the recurrent step."""
    states = lm.empty_state(prompt.shape[0], prompt.device, lm.embedding.weight.dtype)

    @torch.no_grad()
    def prefill():
        logits, new_states = lm(prompt, return_state=True)
        for (conv, ssm), (new_conv, new_ssm) in zip(states, new_states):   # into the buffers the graph reads
            conv.copy_(new_conv)
            ssm.copy_(new_ssm)
        return logits[:, -1].argmax(-1)

    @torch.no_grad()
    def step(token):
        logits, _ = lm.step(token, states)                              # advances the states in place
        return logits.argmax(-1)
    return prefill, step


def gpt_decoder(gpt: GPT, prompt: torch.Tensor):
    """(prefill, step) for time_generation: the prompt fills the KV cache, then one token at a time."""
    cache = gpt.empty_cache(prompt.shape[0], prompt.device, gpt.wte.weight.dtype)
    position = torch.zeros((), dtype=torch.long, device=prompt.device)

    @torch.no_grad()
    def prefill():
        position.zero_()
        logits = gpt(prompt, cache, position)
        position.fill_(prompt.shape[1])
        return logits[:, -1].argmax(-1)

    @torch.no_grad()
    def step(token):
        logits = gpt(token[:, None], cache, position)
        position.add_(1)
        return logits[:, -1].argmax(-1)
    return prefill, step


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def mamba_lm(args) -> MambaLM:
    """The comparison's Mamba, random weights (seed 0): 2·gpt_layers layers of width d_model (a Mamba block has about
    half a Transformer block's parameters)."""
    torch.manual_seed(0)
    return MambaLM(MambaConfig(d_model=args.d_model, n_layers=2 * args.gpt_layers, vocab_size=VOCAB))


def gpt_lm(args, max_len: int) -> GPT:
    """The comparison's Transformer, random weights (seed 0), with positions (and a KV cache) up to max_len."""
    torch.manual_seed(0)
    return GPT(VOCAB, args.d_model, args.gpt_layers, heads=max(1, args.d_model // 64), max_len=max_len)


def generation(args, device, dtype, new_tokens: int) -> dict:
    """Tokens per second of prefill + new_tokens greedy tokens, at each batch size."""
    mamba, gpt = mamba_lm(args), gpt_lm(args, args.prompt + new_tokens)
    results = {"mamba": dict(params=count_parameters(mamba), new_tokens=new_tokens, points=[]),
               "transformer": dict(params=count_parameters(gpt), new_tokens=new_tokens, points=[])}
    use_graph = device.type == "cuda"
    for name, model, decoder in (("mamba", mamba, mamba_decoder), ("transformer", gpt, gpt_decoder)):
        model.to(device=device, dtype=dtype).eval()
        for batch in tqdm(args.batches, desc=f"generation: {name}", leave=False):
            prompt = torch.randint(0, VOCAB, (batch, args.prompt), device=device)
            point = time_generation(*decoder(model, prompt), batch, new_tokens, device, use_graph)
            results[name]["points"].append(dict(batch=batch, **point))
            if point.get("oom"):
                break
        model.cpu()
    return results


# ---------------------------------------------------------------------------------------------------------------------
# Where each model wins: prefill, decoding, training against the context length, and the floors this GPU allows


def graphed(fn, device: torch.device):
    """fn's work as one CUDA-graph replay on a GPU (captured after a warm-up call on a side stream, as capture
    requires), so that both models' steps are timed without the CPU's launch cost; fn itself on a CPU."""
    if device.type != "cuda":
        return fn
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def timed_point(run, device: torch.device, rate: tuple[str, int] | None = None, **point) -> dict:
    """point with run()'s milliseconds (as `ms`) and the peak memory — and, given rate = (key, items per call), the
    items per second under that key — or with oom: True."""
    point = dict(point, **guarded(lambda: timed(run, device), device))
    if rate is not None and "ms" in point:
        point[rate[0]] = rate[1] / point["ms"] * 1e3
    return point


@torch.no_grad()
def prefill(args, mamba: MambaLM, device, dtype) -> dict:
    """Time of one parallel pass over prompts of each length, prefill_tokens tokens per call (batch · length), the
    state (Mamba) or the KV cache (Transformer) filled as generation would. mamba: on device, in dtype."""
    points = {"mamba": [], "transformer": []}
    for length in tqdm(args.prefill_lengths, desc="prefill", leave=False):
        batch = max(1, args.prefill_tokens // length)
        gpt = gpt_lm(args, length).to(device=device, dtype=dtype).eval()
        prompt = torch.randint(0, VOCAB, (batch, length), device=device)
        cache = guarded(lambda: dict(cache=gpt.empty_cache(batch, device, dtype)), device).get("cache")
        points["mamba"].append(timed_point(lambda: mamba(prompt, return_state=True), device, length=length,
                                           batch=batch))
        points["transformer"].append(timed_point(lambda: gpt(prompt, cache, 0), device, length=length, batch=batch)
                                     if cache is not None else dict(length=length, batch=batch, oom=True))
        del gpt, cache
    return points


@torch.no_grad()
def decoding(args, mamba: MambaLM, device, dtype) -> dict:
    """Tokens per second of one decoding step (a CUDA-graph replay) after contexts of each length: the Transformer
    attends to its KV cache of that length; Mamba's state is the same size whatever came before."""
    points = {"mamba": [], "transformer": []}
    for batch in args.decode_batches:
        for context in tqdm(args.decode_contexts, desc=f"decoding, batch {batch}", leave=False):
            gpt = gpt_lm(args, context + 1).to(device=device, dtype=dtype).eval()
            token = torch.zeros(batch, dtype=torch.long, device=device)
            states = mamba.empty_state(batch, device, dtype)
            cache = guarded(lambda: dict(cache=gpt.empty_cache(batch, device, dtype)), device).get("cache")

            def mamba_step():
                mamba.step(token, states)

            def gpt_step():
                gpt(token[:, None], cache, context)
            for name, step in (("mamba", mamba_step), ("transformer", gpt_step if cache is not None else None)):
                point = dict(batch=batch, context=context, oom=True)      # no cache: out of memory already
                if step is not None:                                       # capturing the graph may run out too
                    point = dict(batch=batch, context=context, **guarded(
                        lambda: timed_point(graphed(step, device), device, rate=("tokens_per_s", batch)), device))
                points[name].append(point)
            del gpt, cache
    return points


def training(args, device) -> dict:
    """Training tokens per second (forward + backward of the next-token loss; fp32 weights, bf16 autocast on a GPU)
    at each context length, train_tokens tokens per step."""
    points = {"mamba": [], "transformer": []}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    mamba = mamba_lm(args).to(device).train()                    # one Mamba for every length; a GPT per length
    for length in tqdm(args.train_lengths, desc="training", leave=False):
        batch = max(1, args.train_tokens // length)
        ids = torch.randint(0, VOCAB, (batch, length), device=device)
        for name, model in (("mamba", mamba), ("transformer", gpt_lm(args, length).to(device).train())):

            def step():
                model.zero_grad(set_to_none=True)
                with autocast:
                    logits = model(ids)
                F.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten()).backward()
            points[name].append(timed_point(step, device, rate=("tokens_per_s", batch * length), length=length,
                                            batch=batch))
            del model
    return points


def floors(args, mamba: MambaLM, device, dtype) -> dict:
    """What this GPU allows Mamba. Prefill: its matrix products timed alone at the prefill shape (b·L tokens through
    every layer's four projections and the head) plus the scan kernel's time. Decoding: the bytes a step must read
    (every weight once, the state read and written) over the bandwidth of a large device-to-device copy."""
    config = mamba.config
    length = args.prefill_lengths[len(args.prefill_lengths) // 2]
    tokens = max(1, args.prefill_tokens // length) * length
    x = lambda n: torch.randn(tokens, n, device=device, dtype=dtype)
    w = lambda n, m: torch.randn(m, n, device=device, dtype=dtype)
    d, d_in, r, n = config.d_model, config.d_inner, config.rank, config.d_state
    products = [(x(d), w(d, 2 * d_in)), (x(d_in), w(d_in, r + 2 * n)), (x(r), w(r, d_in)), (x(d_in), w(d_in, d))]
    per_layer = sum(time_ms(lambda a=a, b=b: F.linear(a, b), device) for a, b in products)
    head = time_ms(lambda a=x(d), b=w(d, VOCAB): F.linear(a, b), device)
    scan = measure(scan_maker("auto", tokens // length, d_in, length, n, device, dtype), device)["fwd_ms"]
    prefill_floor = config.n_layers * (per_layer + scan) + head
    big = torch.empty(2 ** 28 if device.type == "cuda" else 2 ** 22, device=device, dtype=torch.uint8)
    copy = big.clone()
    bandwidth = 2 * big.numel() / (time_ms(lambda: copy.copy_(big), device) * 1e-3)        # bytes/s, read + write
    weights = sum(p.numel() * p.element_size() for p in mamba.parameters())
    decode_floors = {}
    for batch in args.decode_batches:
        state = batch * config.n_layers * config.d_inner * ((config.d_conv - 1) * 2 + config.d_state * 4) * 2
        decode_floors[batch] = (weights + state) / bandwidth * 1e3
    return dict(prefill=dict(length=length, batch=tokens // length, ms=prefill_floor, products_ms_per_layer=per_layer,
                             head_ms=head, scan_ms_per_layer=scan),
                decode_step_ms=decode_floors, bandwidth_bytes_per_s=bandwidth, weight_bytes=weights)


@torch.no_grad()
def vision(args, device, dtype) -> dict:
    """Inference of MambaVision and the ViT of its size (vision.py) on random images of each side, a fixed batch,
    both as written in dtype and channels-last, each forward one CUDA-graph replay on a GPU (so that the CPU's launch
    cost, which eager small images are bound by, is not timed): images/s, peak memory, and how time grows with the
    side (the fitted slope of log time against log side, from 64 px on: 2 where the cost follows the pixels)."""
    results = {}
    for size in args.vision_models:
        points = []
        for side in tqdm(args.vision_sides, desc=f"vision: {size}", leave=False):
            model = build_model(size, 3, 100, image_size=side).to(device, dtype, memory_format=torch.channels_last
                                                                  ).eval()
            images = torch.randn(args.vision_batch, 3, side, side, device=device, dtype=dtype
                                 ).contiguous(memory_format=torch.channels_last)
            forward = lambda: model(images)                                                   # noqa: E731

            def point() -> dict:
                forward()                           # eager: its peak memory is the forward's (a replay allocates none)
                peak = peak_memory(device)
                ms = time_ms(graphed(forward, device), device)
                return dict(ms=ms, peak_bytes=peak, images_per_s=args.vision_batch / ms * 1e3)
            points.append(dict(side=side, batch=args.vision_batch, **guarded(point, device)))   # capture may run out
            del model, forward
        results[size] = dict(params=count_parameters(build_model(size, 3, 100)), points=points,
                             slope_ms=fitted_slope(points, "ms", min(64, args.vision_sides[-2]), x="side"))
    return results


def models(args, device, dtype) -> dict:
    """The four comparisons (generation with both new-token counts) and the floors, with Mamba's times as multiples
    of its floors."""
    mamba = mamba_lm(args).to(device=device, dtype=dtype).eval()        # one model for the inference panels
    results = dict(prefill=prefill(args, mamba, device, dtype), decoding=decoding(args, mamba, device, dtype),
                   floors=floors(args, mamba, device, dtype))
    del mamba
    results.update(generation=generation(args, device, dtype, args.new_tokens),
                   generation_long=generation(args, device, dtype, args.long_new_tokens),
                   training=training(args, device))
    floor = results["floors"]
    ours = next(p for p in results["prefill"]["mamba"] if p["length"] == floor["prefill"]["length"])
    floor["prefill"]["ours_over_floor"] = ours.get("ms", math.nan) / floor["prefill"]["ms"]
    step_ms = {p["batch"]: p["ms"] for p in results["decoding"]["mamba"] if "ms" in p}   # the same at any context
    floor["decode_ours_over_floor"] = {b: step_ms.get(b, math.nan) / ms for b, ms in floor["decode_step_ms"].items()}
    return results


# ---------------------------------------------------------------------------------------------------------------------
# Our kernel against the official one


def kernel_table(device, anchors_path: Path) -> dict:
    """Ours (fwd, fwd+bwd) and SDPA timed now, against the official kernel and SDPA in the anchors file."""
    rows = json.loads(anchors_path.read_text())["rows"]
    official = {(r["batch"], r["seqlen"], r["d_state"]): r for r in rows if r["op"] == "official_cuda_selective_scan"}
    sdpa_then = {(r["batch"], r["seqlen"]): r for r in rows if r["op"] == "torch_sdpa_causal"}
    table = []
    for batch, seqlen in tqdm([(8, 2048), (8, 8192), (8, 16384), (1, 131072)], desc="kernel", leave=False):
        ours = measure(scan_maker("triton", batch, 1536, seqlen, 16, device, torch.bfloat16), device)
        sdpa = measure(attention_maker(sdpa_attention, batch, seqlen, device, torch.bfloat16), device)
        ref, ref_sdpa = official[(batch, seqlen, 16)], sdpa_then[(batch, seqlen)]
        data_bytes = 2 * sum(x.numel() * x.element_size() for x in scan_inputs(batch, 1536, seqlen, 16, "meta").values()
                             if isinstance(x, torch.Tensor)) + batch * 1536 * seqlen * 2   # inputs + grads + output
        row = dict(batch=batch, d_inner=1536, seqlen=seqlen, d_state=16, ours_fwd_ms=ours["fwd_ms"],
                   ours_fwd_bwd_ms=ours["fwd_bwd_ms"], sdpa_fwd_ms=sdpa["fwd_ms"], sdpa_fwd_bwd_ms=sdpa["fwd_bwd_ms"],
                   official_fwd_ms=ref["fwd_ms"], official_fwd_bwd_ms=ref["fwd_plus_bwd_ms"],
                   peak_over_inputs_outputs_grads=ours["peak_bytes"] / data_bytes)
        for part, anchor_key in (("fwd", "fwd_ms"), ("fwd_bwd", "fwd_plus_bwd_ms")):
            row[f"ratio_{part}"] = row[f"ours_{part}_ms"] / row[f"official_{part}_ms"]
            row[f"ratio_{part}_sdpa_normalised"] = ((row[f"ours_{part}_ms"] / row[f"sdpa_{part}_ms"])
                                                    / (ref[anchor_key] / ref_sdpa[anchor_key]))
        table.append(row)
    sweep = []
    for d_state in (4, 8, 16, 32, 64):
        ours = measure(scan_maker("triton", 8, 1536, 4096, d_state, device, torch.bfloat16), device)
        sweep.append(dict(d_state=d_state, ours_fwd_ms=ours["fwd_ms"], ours_fwd_bwd_ms=ours["fwd_bwd_ms"],
                          official_fwd_ms=official[(8, 4096, d_state)]["fwd_ms"]))
    segments = []                                   # 1·128K: how many sequence segments pay (tile_config's choice)
    for n_segments in (4, 6, 8, 11, 12, 16, 24):
        ours = measure(scan_maker("triton", 1, 1536, 131072, 16, device, torch.bfloat16,
                                  config=dict(n_segments=n_segments)), device)
        segments.append(dict(n_segments=n_segments, ours_fwd_ms=ours["fwd_ms"], ours_fwd_bwd_ms=ours["fwd_bwd_ms"]))
    return dict(shapes=table, d_state_sweep=sweep, segments_sweep_1x1536x131072=segments)


# ---------------------------------------------------------------------------------------------------------------------
# Why selection matters: selective copying (selective_copying.py)


def selective_copying(args, device) -> dict:
    """The selective model and the time-invariant one trained the same way; accuracy against steps, and the paper's
    Table 1 figures (the Mamba block with S6 / with S4, at length 4096) beside them."""
    results = dict(setting=args.copying, paper_accuracy={"selective": 0.998, "time-invariant": 0.564})
    for name, selective in (("selective", True), ("time-invariant", False)):
        start = time.perf_counter()
        history = train_copying(selective, device=device, desc=name, **args.copying)
        results[name] = dict(history=history, final_accuracy=history[-1]["accuracy"],
                             seconds=time.perf_counter() - start)
    return results


def plot_copying(results: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name in ("selective", "time-invariant"):
        history = results[name]["history"]
        line, = ax.plot([h["step"] for h in history], [h["accuracy"] for h in history], "o-", ms=3, label=name)
        ax.axhline(results["paper_accuracy"][name], color=line.get_color(), ls=":", lw=1,
                   label=f"paper, {name} (Table 1)")
    s = results["setting"]
    ax.set_title(f"selective copying: {s['n_data']} data tokens in {s['seqlen']}, {s['n_layers']} × {s['d_model']}",
                 fontsize=10)
    ax.set_xlabel("training step")
    ax.set_ylabel("token accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------------------------------------------------------------
# Reporting


def pyplot():
    """matplotlib.pyplot on its file-only backend (no display needed), imported when a figure is drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def print_scaling(results: dict) -> None:
    print("\nscaling (batch 1; ms, forward+backward; MiB peak)")
    for name, r in results.items():
        cells = []
        for p in r["points"]:
            cell = "OOM" if p.get("oom") else "-" if p.get("skipped") else f"{p['fwd_bwd_ms']:.3g}"
            cells.append(f"{p['seqlen']}:{cell}")
        slope = r["slope_fwd_bwd_ms"]
        print(f"  {name:22s} slope {slope:.2f}  " if slope is not None else f"  {name:22s} slope  -    ", " ".join(cells))


def print_generation(results: dict) -> None:
    print(f"\ngeneration (tokens/s), {results['mamba']['new_tokens']} new tokens")
    for name, r in results.items():
        cells = " ".join(f"b{p['batch']}:{'OOM' if p.get('oom') else format(p['tokens_per_s'], '.0f')}" for p in r["points"])
        print(f"  {name:12s} {r['params'] / 1e6:.0f}M params  {cells}")


def print_kernel(results: dict) -> None:
    print("\nkernel: ours vs the official CUDA kernel (ms; ratio = ours/official; SDPA-normalised in brackets)")
    print(f"  {'shape':18s} {'ours fwd':>9s} {'official':>9s} {'ratio':>13s} {'ours f+b':>9s} {'official':>9s} "
          f"{'ratio':>13s} {'SDPA fwd/f+b now':>18s} {'peak/(in+out+grad)':>19s}")
    for r in results["shapes"]:
        print(f"  {r['batch']}x{r['d_inner']}x{r['seqlen']:<8d} {r['ours_fwd_ms']:9.3f} {r['official_fwd_ms']:9.3f} "
              f"{r['ratio_fwd']:5.2f} ({r['ratio_fwd_sdpa_normalised']:4.2f}) {r['ours_fwd_bwd_ms']:9.3f} "
              f"{r['official_fwd_bwd_ms']:9.3f} {r['ratio_fwd_bwd']:5.2f} ({r['ratio_fwd_bwd_sdpa_normalised']:4.2f}) "
              f"{r['sdpa_fwd_ms']:8.3f}/{r['sdpa_fwd_bwd_ms']:<8.3f} {r['peak_over_inputs_outputs_grads']:19.2f}")
    print("  d_state sweep at 8x1536x4096, forward ms (ours / official):",
          ", ".join(f"{r['d_state']}: {r['ours_fwd_ms']:.3f}/{r['official_fwd_ms']:.3f}" for r in results["d_state_sweep"]))
    print("  sequence segments at 1x1536x131072, ms (forward / forward+backward):",
          ", ".join(f"{r['n_segments']}: {r['ours_fwd_ms']:.3f}/{r['ours_fwd_bwd_ms']:.2f}"
                    for r in results["segments_sweep_1x1536x131072"]))


def print_models(results: dict) -> None:
    print_generation(results["generation"])
    print_generation(results["generation_long"])
    rows = (("prefill", "length", "ms", "ms"), ("decoding", "context", "tokens_per_s", "tokens/s"),
            ("training", "length", "tokens_per_s", "tokens/s"))
    for section, x, y, unit in rows:
        print(f"\n{section} ({unit}; Mamba / Transformer)")
        for m, t in zip(results[section]["mamba"], results[section]["transformer"]):
            cell = lambda p: "OOM" if p.get("oom") else format(p[y], ".4g")
            print(f"  batch {m['batch']:4d} {x} {m[x]:6d}: {cell(m):>9s} / {cell(t):>9s}")
    floor = results["floors"]
    print(f"\nfloors: prefill {floor['prefill']['ms']:.3g} ms at {floor['prefill']['batch']} x "
          f"{floor['prefill']['length']} (ours {floor['prefill']['ours_over_floor']:.2f}x); decoding step " +
          ", ".join(f"batch {b}: {ms:.3g} ms (ours {floor['decode_ours_over_floor'][b]:.2f}x)"
                    for b, ms in floor["decode_step_ms"].items()))


def print_copying(results: dict) -> None:
    print(f"\nselective copying ({results['setting']}): token accuracy against steps")
    for name in ("selective", "time-invariant"):
        r = results[name]
        print(f"  {name:15s} " + " ".join(f"{h['step']}:{h['accuracy']:.3f}" for h in r["history"]) +
              f"  ({r['seconds']:.0f} s; paper {results['paper_accuracy'][name]:.3f})")


def print_vision(results: dict) -> None:
    print("\nvision inference (images/s; peak MiB)")
    for size, r in results.items():
        cells = " ".join(f"{p['side']}px:" + ("OOM" if p.get("oom") else f"{p['images_per_s']:.0f}/"
                                                f"{(p['peak_bytes'] or 0) / 2 ** 20:.0f}") for p in r["points"])
        slope = "-" if r["slope_ms"] is None else f"{r['slope_ms']:.2f}"
        print(f"  {size:10s} {r['params'] / 1e6:.2f}M params, time ∝ side^{slope}  {cells}")


def plot_models(results: dict, path: Path) -> None:
    """Five panels: prefill time and training throughput against length, decoding against context, generation
    against batch (both new-token counts), vision inference against image side (when results has it)."""
    plt = pyplot()
    with_vision = "vision" in results
    fig, axes = plt.subplots(1, 5 if with_vision else 4, figsize=(27 if with_vision else 22, 5))
    panels = ((axes[0], "prefill", "length", "ms", "prefill: ms per call (constant tokens per call)"),
              (axes[1], "decoding", "context", "tokens_per_s", "decoding: tokens/s against context"),
              (axes[3], "training", "length", "tokens_per_s", "training: tokens/s (constant tokens per step)"))
    for ax, section, x, y, title in panels:
        for name, points in results[section].items():
            for batch in sorted({p["batch"] for p in points}) if section == "decoding" else [None]:
                pts = [p for p in points if y in p and (batch is None or p["batch"] == batch)]
                label = name if batch is None else f"{name}, batch {batch}"
                ax.loglog([p[x] for p in pts], [p[y] for p in pts], "o-", label=label, ms=3)
        ax.set_xlabel(x + " (tokens)")
        ax.set_title(title)
    ax = axes[2]
    for key, style in (("generation", "o-"), ("generation_long", "s--")):
        for name, r in results[key].items():
            pts = [p for p in r["points"] if p.get("tokens_per_s")]
            ax.loglog([p["batch"] for p in pts], [p["tokens_per_s"] for p in pts], style, ms=3,
                      label=f"{name}, {r['new_tokens']} new tokens")
    ax.set_xlabel("batch size")
    ax.set_title("generation: prompt + new tokens, tokens/s")
    if with_vision:
        vision_panel(axes[4], results["vision"])
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def vision_panel(ax, results: dict) -> None:
    """Images/s against the image side, each model labelled with the fitted growth of its time."""
    for size, r in results.items():
        pts = [p for p in r["points"] if p.get("images_per_s")]
        slope = "" if r["slope_ms"] is None else f", time ∝ side^{r['slope_ms']:.2f}"
        ax.loglog([p["side"] for p in pts], [p["images_per_s"] for p in pts], "o-", ms=3, label=size + slope)
    ax.set_xlabel("image side (px)")
    ax.set_title("vision: inference images/s")


def plot_vision(results: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    vision_panel(ax, results)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.2))
    for ax, key, title in ((axes[0], "fwd_bwd_ms", "forward + backward time (ms)"),
                           (axes[1], "peak_bytes", "peak memory, forward + backward (bytes)")):
        for name, r in results["scaling"].items():
            pts = [p for p in r["points"] if p.get(key)]
            slope = r[f"slope_{key}"]
            label = f"{name}  (slope {slope:.2f})" if slope is not None else name
            line, = ax.loglog([p["seqlen"] for p in pts], [p[key] for p in pts], "o-", label=label, ms=3)
            ooms = [p["seqlen"] for p in r["points"] if p.get("oom")]
            if ooms:
                ax.plot(ooms, [1.0] * len(ooms), "x", color=line.get_color(), ms=9, transform=ax.get_xaxis_transform())
        ax.set_xlabel("sequence length (tokens, batch 1)")
        ax.set_title(title + ("\n× at the top: out of memory" if key == "peak_bytes" else ""))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[2]
    for name, r in results["models"]["generation"].items():
        pts = [p for p in r["points"] if p.get("tokens_per_s")]
        ax.loglog([p["batch"] for p in pts], [p["tokens_per_s"] for p in pts], "o-",
                  label=f"{name} ({r['params'] / 1e6:.0f}M)", ms=3)
    ax.set_xlabel("batch size")
    ax.set_title("generation throughput (tokens/s)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: under a minute on a CPU")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--kernel", action="store_true", help="only the comparison with the official CUDA kernel")
    only.add_argument("--selective-copying", action="store_true",
                      help="only the selective-copying task: the selective scan against a time-invariant one")
    only.add_argument("--vision", action="store_true", help="only the vision section: MambaVision against its ViT")
    only.add_argument("--models", action="store_true", help="only the language models: generation and models")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--anchors", type=Path, default=Path(__file__).resolve().parent / "anchors" /
                        "h200_reference_timings.json", help="reference timings of the official kernel")
    parser.add_argument("--max-seconds", type=bounded(float, 0, open_low=True), default=2.0,
                        help="stop a method after a point this slow")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda but no GPU is visible; use --device cpu (with --quick)")
    if args.kernel and not args.anchors.is_file():
        fail(f"--kernel: no reference timings at {args.anchors} (see --anchors)")
    if args.kernel and args.device != "cuda":
        fail("--kernel times the Triton kernel against the official CUDA kernel; it needs a GPU")
    device = torch.device(args.device)
    sizes = (dict(d_inner=64, min_len=64, max_len=1024, ref_max_len=256, fit_from=64, d_model=64, gpt_layers=1,
                  prompt=32, new_tokens=8, long_new_tokens=16, batches=[1, 2, 4], prefill_lengths=[16, 32, 64],
                  prefill_tokens=128, decode_contexts=[16, 64], decode_batches=[1, 2], train_lengths=[16, 32, 64],
                  train_tokens=128, vision_models=["tiny", "vit-tiny"], vision_sides=[16, 32], vision_batch=4)
             if args.quick else
             dict(d_inner=1536, min_len=256, max_len=2 ** 22, ref_max_len=2048, fit_from=8192, d_model=768,
                  gpt_layers=12, prompt=2048, new_tokens=128, long_new_tokens=1024,
                  batches=[1, 2, 4, 8, 16, 32, 64, 128], prefill_lengths=[2 ** k for k in range(9, 17)],
                  prefill_tokens=2 ** 17, decode_contexts=[2 ** k for k in range(10, 17)], decode_batches=[1, 16, 64],
                  train_lengths=[2 ** k for k in range(11, 17)], train_tokens=2 ** 16,
                  vision_models=["small", "vit-small"], vision_sides=[32, 64, 128, 224], vision_batch=64))
    sizes["copying"] = (dict(seqlen=32, n_data=4, vocab=8, d_model=32, n_layers=2, batch=32, lr=3e-3, steps=500,
                             eval_every=100) if args.quick else
                        dict(seqlen=256, n_data=16, vocab=16, d_model=128, n_layers=2, batch=128, lr=1e-3,
                             steps=10000, eval_every=500))
    for key, value in sizes.items():
        setattr(args, key, value)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.out = output_folder(args.out)
    results = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   torch=torch.__version__, dtype=str(dtype), sizes=sizes)
    alone = {"kernel": (lambda: kernel_table(device, args.anchors), print_kernel, None),     # the sections run alone
             "selective_copying": (lambda: selective_copying(args, device), print_copying, plot_copying),
             "vision": (lambda: vision(args, device, dtype), print_vision, plot_vision),
             "models": (lambda: models(args, device, dtype), print_models, plot_models)}
    for section, (measure_section, show, draw) in alone.items():
        if getattr(args, section):
            results[section] = measure_section()
            show(results[section])
            (args.out / f"{section}.json").write_text(json.dumps(results, indent=1))
            if draw is not None:
                draw(results[section], args.out / f"{section}.png")
            return
    results["scaling"] = scaling(args, device, dtype)
    print_scaling(results["scaling"])
    results["models"] = models(args, device, dtype)
    print_models(results["models"])
    results["vision"] = vision(args, device, dtype)
    print_vision(results["vision"])
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "scaling.png")
    plot_models(dict(results["models"], vision=results["vision"]), args.out / "models.png")
    print(f"\nwrote {args.out / 'results.json'}, {args.out / 'scaling.png'} and {args.out / 'models.png'}")


if __name__ == "__main__":
    main()
