"""Peers of mtp's decoder on the same weights, prompts and machine, for benchmarks/decode.py.

- transformers (torch, on the GPU where torch sees one, else this CPU): greedy `generate`,
  batched with left padding, and its prompt-lookup decoding (`prompt_lookup_num_tokens`,
  batch 1 only);
- llama.cpp (llama-cpp-python): plain greedy decoding of a GGUF file written from the
  checkpoint (`mtp.model.convert.export_gguf`), float32 and float16, batch 1 only (its
  Python API decodes one sequence at a time).

Both are optional: `pip install -e ".[oracle]"` (torch 2.13 CPU wheel, transformers) and
`pip install -e ".[peers]"` (llama-cpp-python, which builds llama.cpp with cmake, ~5 min on
2 cores). A runner decodes a call of prompts (token ids) and returns the emitted ids per
prompt; benchmarks/decode.py warms it up and times it in the same rounds as mtp's modes.
"""

from __future__ import annotations

import os

import numpy as np

PEERS = ("transformers", "prompt_lookup", "llamacpp_f32", "llamacpp_f16")
LOOKUP_TOKENS = 10  # prompt-lookup draft length (transformers' documented example value)


def best_total(walls_rg) -> float:
    """The wall time of a pass over all groups: each group's best of the repeats (R, G),
    summed. The best, as `timeit` takes it: on a shared machine other load only ever adds
    time, in bursts that the median of a few whole passes still catches."""
    return float(np.min(np.asarray(walls_rg), axis=0).sum())


def transformers_runner(hf_dir, eos_id, pad_id, max_new, prompt_lookup=False):
    """run(prompts) -> emitted ids per prompt, with transformers + torch on the GPU torch sees,
    else on all this machine's cores: the device mtp's JAX decodes on."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval().to(device)

    def run(prompts):
        if prompt_lookup and len(prompts) > 1:
            raise ValueError("transformers' prompt-lookup decoding runs at batch 1 only")
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding: every row ends at the last column
            ids[i, width - len(p) :] = torch.as_tensor(np.asarray(p, np.int64))
            mask[i, width - len(p) :] = 1
        kw = dict(prompt_lookup_num_tokens=LOOKUP_TOKENS) if prompt_lookup else {}
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                max_new_tokens=max_new, eos_token_id=eos_id, pad_token_id=pad_id, **kw,
            )  # fmt: skip
        rows = []
        for r in out[:, width:].cpu().numpy():  # waits for the device
            stop = np.flatnonzero(r == eos_id)
            rows.append(r[: stop[0] + 1] if stop.size else r)
        return rows

    return run


def llamacpp_runner(gguf_path, eos_id, max_new, n_ctx):
    """run(prompts) -> emitted ids per prompt, with llama.cpp on all this machine's cores."""
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(gguf_path), n_ctx=n_ctx, n_threads=os.cpu_count(),
        n_threads_batch=os.cpu_count(), verbose=False,
    )  # fmt: skip

    def run(prompts):
        rows = []
        for p in prompts:
            llm.reset()
            out = []
            for tok in llm.generate([int(t) for t in p], temp=0.0, top_k=1, reset=True):
                out.append(tok)
                if tok == eos_id or len(out) == max_new:
                    break
            rows.append(np.array(out, np.int64))
        return rows

    return run


def peer_files(system, tok, out_dir, peers):
    """The checkpoint's main model as the peers read it: {'hf': DIR} and, for llama.cpp,
    {'f32': GGUF, 'f16': GGUF} with the tokenizer of the GGUF it was loaded from
    (`model.init_from`, plus the tokens mtp added: thinking, pause)."""
    init_from = system.main.cfg.init_from
    from mtp.config.sources import local_source
    from mtp.model.convert import export_gguf, export_hf

    files = {"hf": os.path.join(out_dir, "hf")}
    export_hf(system.main, files["hf"])
    if any(p.startswith("llamacpp") for p in peers):
        kind, _, src = local_source(init_from).partition(":") if init_from else ("", "", "")
        if kind != "gguf":
            raise SystemExit(
                "--peers=llamacpp_*: the main model must come from a GGUF file (its "
                "tokenizer is copied into the files llama.cpp reads)"
            )
        added = [tok.token(i) for i in range(tok.base_vocab_size, system.main.cfg.vocab_size)]
        for dtype in ("f32", "f16"):
            files[dtype] = os.path.join(out_dir, f"main.{dtype}.gguf")
            export_gguf(system.main, files[dtype], "float" + dtype[1:], src, added)
    return files


def peer_runner(name, files, batch, *, eos_id, pad_id, max_new, n_ctx):
    """run(prompts) -> emitted ids per prompt, for peer `name` at `batch` rows per call, or
    None where the peer does not run at that batch size. files: {'hf': DIR, 'f32': GGUF,
    'f16': GGUF}."""
    if name != "transformers" and batch > 1:
        return None
    if name in ("transformers", "prompt_lookup"):
        return transformers_runner(files["hf"], eos_id, pad_id, max_new, name == "prompt_lookup")
    return llamacpp_runner(files[name.rpartition("_")[2]], eos_id, max_new, n_ctx)
