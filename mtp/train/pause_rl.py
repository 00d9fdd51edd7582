"""Learned pausing: RL on when to emit `<pause>`, priced by an urgency input.

Each step draws `prompts_per_step` train problems, gives half of them urgency
0 and half urgency 1 (the scalar the model embeds at every position,
`model.use_urgency`), and decodes `group_size` answers for each with the
`learned` pause policy (`mtp.decode.pause`): the model decides itself, pass by
pass, whether to spend a `<pause>` or answer, that decision sampled at
temperature 1, the answer token greedy (the answer the report will score). The
reward is the verifier's score minus `pause_price * urgency * pauses`, so a
pause is free at urgency 0 and costs at urgency 1: one model learns to trade
accuracy for passes on request. Advantages are group-normalised (GRPO) within
each group (same prompt, same urgency); the policy loss is that of `mtp.train.rl`
(each decision is its own pass) on the log-probability of the decision, pause
or go on (`rl.token_stats` with `decision`), with the urgency passed to the
teacher-forced forward. Steps where the policy had no choice (the cap
reached, or past the first answer token) are masked out of the loss.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from mtp import checkpoint as ckpt
from mtp.config import Configs, RLConfig
from mtp.data.task_data import parse_task_spec
from mtp.data.tokenizer import EOS_ID, PAD_ID, ByteTokenizer
from mtp.decode.pause import PauseDecoder, PausePolicy, PauseResult
from mtp.metrics import MetricWriter, progress
from mtp.train import rl
from mtp.train.pause import phase_done, save_system
from mtp.train.pause_data import prompt_head


def answer_text(tok: ByteTokenizer, answer: np.ndarray) -> str:
    """Text of answer tokens up to (not including) <eos>; specials dropped."""
    stop = np.flatnonzero(answer == EOS_ID)
    return tok.decode(answer[: stop[0]] if stop.size else answer)


def rl_batch(heads, res: PauseResult, adv_b, urgency_b) -> dict:
    """Teacher-forcing rows head + pauses/answer; the mask covers the steps where the policy
    chose between pausing and answering (not those after the cap or past the first answer
    token, where it had no choice)."""
    b = len(heads)
    length = max(h.size + n for h, n in zip(heads, res.seq_lengths, strict=True))
    length = -(-length // 16) * 16  # few shapes: few compiles of the RL step
    tokens = np.full((b, length), PAD_ID, np.int32)
    mask = np.zeros((b, length), np.float32)
    for i, h in enumerate(heads):
        n = int(res.seq_lengths[i])
        tokens[i, : h.size] = h
        tokens[i, h.size : h.size + n] = res.seq[i, :n]
        mask[i, h.size : h.size + n] = res.choice[i, :n]
    return dict(
        tokens=tokens,
        offset=np.zeros_like(tokens),
        pass_=np.broadcast_to(np.arange(length, dtype=np.int32), (b, length)).copy(),
        mask=mask,
        adv=np.asarray(adv_b, np.float32),
        old_lp=np.zeros((b, length), np.float32),
        ref_lp=np.zeros((b, length), np.float32),
        urgency=np.asarray(urgency_b, np.float32),
        decision=mask.copy(),  # each step in the mask chose pause / go on; answers are greedy
    )


def train_pause_rl(config, cs: Configs, workdir, *, init_dir) -> None:
    """`pause.rl_steps` RL steps from the weights in `init_dir`; saved in `workdir`."""
    workdir = Path(workdir)
    if phase_done(workdir):
        return
    pc = cs.pause
    task, _ = parse_task_spec(pc.task)
    tok = ByteTokenizer()
    system, _ = ckpt.load_system(init_dir)
    rc = RLConfig(lr=pc.rl_lr, loss=pc.rl_loss, temperature=1.0, warmup_steps=5, ppo_epochs=1,
                  steps=max(pc.rl_steps, 1), group_size=pc.group_size)  # fmt: skip
    graphdef, state = nnx.split((system, rl.rl_optimizer(system, rc, "both")))
    step_fn = jax.jit(functools.partial(rl.rl_step, graphdef, rc=rc, trainable="both"),
                      donate_argnums=0)  # fmt: skip
    dec = PauseDecoder(system)
    policy = PausePolicy("learned", cap=pc.cap)
    rng = np.random.default_rng(cs.seed + 2)
    pool = task.examples("train", 4096)
    p, g = pc.prompts_per_step, pc.group_size
    answer_tokens = task.max_answer_len + 1  # + <eos>
    writer = MetricWriter(workdir, tensorboard=False)
    with progress(pc.rl_steps, desc="learned (rl)") as bar:
        for step in range(1, pc.rl_steps + 1):
            exs = [pool[i] for i in rng.integers(0, len(pool), p)]
            urg_p = (np.arange(p) % 2).astype(np.float32)  # half urgency 0, half urgency 1
            heads = [prompt_head(tok, ex.prompt, ex.thought) for ex in exs for _ in range(g)]
            urg_b = np.repeat(urg_p, g)
            res = dec.generate(heads, policy, max_new_tokens=answer_tokens, temperature=1.0,
                               answer_temperature=0.0, urgency_b=urg_b,
                               seed=int(rng.integers(2**31)))  # fmt: skip
            scores = np.array([task.score(exs[i // g].prompt, answer_text(tok, res.row(i)))
                               for i in range(p * g)])  # fmt: skip
            rewards = scores - pc.pause_price * urg_b * res.pauses
            adv = rl.ADVANTAGES["grpo"](rewards.reshape(p, g)).reshape(-1)
            state, metrics, _ = step_fn(state, rl_batch(heads, res, adv, urg_b), True)
            system, _ = nnx.merge(graphdef, state)
            dec.set_weights(system)
            m = jax.device_get(metrics)
            u1 = urg_b == 1
            m |= dict(reward=rewards.mean(), accuracy=scores.mean(),
                      pauses_u0=res.pauses[~u1].mean(), pauses_u1=res.pauses[u1].mean(),
                      accuracy_u0=scores[~u1].mean(), accuracy_u1=scores[u1].mean())  # fmt: skip
            writer.write("rl", step, m)
            bar.update(1)
            bar.set_postfix(acc=f"{m['accuracy']:.2f}", p0=f"{m['pauses_u0']:.1f}",
                            p1=f"{m['pauses_u1']:.1f}")  # fmt: skip
    writer.close()
    system, _ = nnx.merge(graphdef, state)
    save_system(config, workdir, system, pc.rl_steps, cs.train)
