"""Drafters: incremental drafting equals the teacher-forced forward, for every kind and head;
the registry of kinds and the config's names agree; shared heads read the main model's
tables (gradient or not); a trimmed draft vocabulary maps back to full ids."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mtp.config import DrafterConfig, ModelConfig, UserError
from mtp.config.model import DRAFTER_KINDS
from mtp.data.token_counts import most_frequent
from mtp.decode.sampling import Sampling, choose
from mtp.model import drafter as drafters
from mtp.model.system import DraftIds, MTPSystem
from mtp.model.taps import Past
from mtp.train.losses import offset_weights, supervised_loss

MAIN = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, taps=(0, 1))


DRAFT_IDS = np.sort(np.random.default_rng(0).choice(MAIN.vocab_size, 17, replace=False))


def _system(kind="transformer", head="own", draft_vocab=0, main=MAIN, **kw):
    cfg = DrafterConfig(kind=kind, k=4, n_layers=2, head=head, draft_vocab=draft_vocab, **kw)
    ids = DRAFT_IDS if draft_vocab else None
    return MTPSystem(main, cfg, pad_id=0, draft_ids=ids, rngs=nnx.Rngs(0))


# Every kind greedy and sampled with its own full head; every kind with a shared trimmed head;
# an own trimmed head sampled (the map from draft ids is the same code for every kind).
CHAINS = [(kind, sampled, "own", 0) for kind in DRAFTER_KINDS for sampled in (False, True)]
CHAINS += [(kind, False, "shared", 17) for kind in DRAFTER_KINDS] + [("rnn", True, "own", 17)]


@pytest.mark.parametrize("kind, sampled, head, draft_vocab", CHAINS)
def test_draft_equals_teacher_forcing_on_the_chosen_chain(kind, sampled, head, draft_vocab):
    """`draft` (start, then one step per token) gives the logits the teacher-forced `__call__`
    gives when fed y0 and the drafted tokens, and each drafted token is the choice from them,
    a full-vocabulary id (a trimmed head's choice mapped through the draft ids)."""
    k, b = 4, 6
    system = _system(kind, head, draft_vocab)
    drafter, tables = system.drafter, system.tables()
    taps_bld = jax.random.normal(jax.random.key(1), (b, len(MAIN.taps), MAIN.d_model))
    y0_b = jnp.arange(b, dtype=jnp.int32)
    s = Sampling(temperature=1.0 if sampled else 0.0)
    keys = jax.random.split(jax.random.key(2), k)
    pick = lambda logits_bu, j: choose(logits_bu, s, keys[j])
    tokens_bk, logits_bku, _ = jax.jit(lambda t, y: system.draft(t, y, pick))(taps_bld, y0_b)
    assert logits_bku.shape == (b, k, draft_vocab or MAIN.vocab_size)
    inputs_bk = jnp.concatenate([y0_b[:, None], tokens_bk[:, :-1]], axis=1)
    shared = () if tables is None else (tables,)
    x_bkd = drafter(taps_bld[:, None], inputs_bk[:, None], *shared)[:, 0]
    want_bku = drafter.logits(x_bkd, tables)
    np.testing.assert_allclose(logits_bku, want_bku, atol=1e-5)
    ids = np.arange(MAIN.vocab_size) if not draft_vocab else DRAFT_IDS
    for j in range(k):
        np.testing.assert_array_equal(tokens_bk[:, j], ids[pick(want_bku[:, j], j)])
    if kind != "medusa":  # the chain is not constant, so feeding the tokens is exercised
        assert len(np.unique(np.asarray(tokens_bk))) > 1


def _draft_loss(system, tokens_bt):
    """The drafter's loss alone, as training computes it (one offset at a time)."""
    logits_btv, drafts = system.forward(tokens_bt)
    mask_bt = jnp.ones(tokens_bt.shape, jnp.float32)
    w_k = offset_weights(system.k, 0.8)
    return supervised_loss(logits_btv, drafts, tokens_bt, mask_bt, draft_weights_k=w_k)[1][
        "loss/draft"
    ]


@pytest.mark.parametrize(
    "head, tie", [("own", True), ("shared", True), ("shared", False), ("shared_frozen", False)]
)
def test_shared_head_trains_the_main_tables_unless_frozen(head, tie):
    """With the taps detached, the drafter's loss reaches the main model only through a
    'shared' head: its embedding (tied) or its embedding and untied head kernel; not through
    'shared_frozen' or 'own'. A shared drafter holds no embedding or head of its own."""
    main = dataclasses.replace(MAIN, tie_embeddings=tie)
    system = _system("transformer", head, 17, main=main, detach=True)
    tokens_bt = jax.random.randint(jax.random.key(3), (2, 9), 0, MAIN.vocab_size)
    grads = nnx.state(nnx.jit(nnx.grad(_draft_loss))(system, tokens_bt))
    norm = lambda tree: float(optax.global_norm(jax.tree.leaves(tree)))
    reached = [norm(grads["main"]["embed"])] + ([] if tie else [norm(grads["main"]["head"])])
    if head == "shared":
        assert min(reached) > 0, reached
    else:
        assert max(reached) == 0.0, reached
    assert norm(grads["drafter"]) > 0
    own = {"embed", "head"} & set(nnx.state(system.drafter))
    assert own == (set() if head != "own" else {"embed", "head"})


def test_a_shared_trimmed_head_is_the_main_heads_rows_at_the_draft_ids():
    for tie in (True, False):
        main = dataclasses.replace(MAIN, tie_embeddings=tie)
        system = _system("rnn", "shared", 17, main=main)
        x_bd = jax.random.normal(jax.random.key(4), (3, MAIN.d_model))
        w_dv = system.main.embed.embedding[...].T if tie else system.main.head.kernel[...]
        want_bu = system.drafter.out_norm(x_bd) @ w_dv[:, DRAFT_IDS]
        np.testing.assert_allclose(system.drafter.logits(x_bd, system.tables()), want_bu, atol=1e-5)


def test_draft_ids_are_a_stored_variable_not_a_parameter():
    system = _system("rnn", "own", 17)
    assert isinstance(system.draft_ids, DraftIds)
    np.testing.assert_array_equal(nnx.state(system, DraftIds)["draft_ids"][...], DRAFT_IDS)
    assert "draft_ids" not in nnx.state(system, nnx.Param)
    default = MTPSystem(MAIN, DrafterConfig(draft_vocab=5), pad_id=0, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(default.ids(), np.arange(5))
    with pytest.raises(ValueError, match="draft_ids"):
        MTPSystem(MAIN, DrafterConfig(draft_vocab=5), pad_id=0, draft_ids=[1, 2], rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kind", DRAFTER_KINDS)
def test_drafter_parameters_are_stored_in_the_models_param_dtype(kind):
    main = dataclasses.replace(MAIN, param_dtype="bfloat16")
    params = jax.tree.leaves(nnx.state(_system(kind, main=main).drafter, nnx.Param))
    assert params and {x.dtype for x in params} == {jnp.dtype("bfloat16")}


def test_most_frequent_keeps_the_specials_and_the_commonest_tokens():
    arrays = [np.array([[5, 5, 5, 2], [2, 9, 9, 9]]), np.array([9, 7, 7])]
    np.testing.assert_array_equal(most_frequent(arrays, 3, 12, always=(0,)), [0, 5, 9])
    np.testing.assert_array_equal(most_frequent(arrays, 4, 12, always=(0, 1)), [0, 1, 5, 9])
    np.testing.assert_array_equal(most_frequent(arrays, 5, 12), [0, 2, 5, 7, 9])  # 0 unseen
    with pytest.raises(UserError, match="drafter.draft_vocab"):
        most_frequent(arrays, 13, 12)


def test_config_kinds_and_registered_drafters_agree(monkeypatch):
    """A name outside DRAFTER_KINDS can't register; a kind left unregistered fails the check
    drafter.py runs at import."""
    assert set(drafters.DRAFTERS) == set(DRAFTER_KINDS)
    with pytest.raises(ValueError, match="DRAFTER_KINDS"):
        drafters.register("lstm")
    monkeypatch.delitem(drafters.DRAFTERS, "rnn")
    with pytest.raises(ImportError, match="rnn"):
        drafters._check_registry()


def test_a_kind_without_its_incremental_step_cannot_register(monkeypatch):
    """Every kind defines its forward, `start` and `step`; one without `step` is refused."""
    monkeypatch.delitem(drafters.DRAFTERS, "rnn")

    class NoStep(drafters.DrafterBase):
        def __call__(self, taps_btld, inputs_btk):
            return inputs_btk

        def start(self, taps_bld):
            return taps_bld

    with pytest.raises(TypeError, match="lacks step"):
        drafters.register("rnn")(NoStep)
    assert "rnn" not in drafters.DRAFTERS


def test_a_context_drafter_drafts_as_teacher_forcing_and_reads_the_past_only():
    """With drafter.context, drafting from root t with the context cache written over a whole
    row (slots past t, which drafting overwrites, included) gives the teacher-forced logits
    at t; those change with the taps at s < t and not with the taps after t."""
    k, b, t = 4, 3, 9
    drafter = _system("transformer", context=True).drafter
    taps_btld = jax.random.normal(jax.random.key(1), (b, t, len(MAIN.taps), MAIN.d_model))
    slot_bt = jnp.broadcast_to(jnp.arange(t), (b, t))
    root_b, rows = jnp.array([0, 4, 7]), jnp.arange(b)
    y0_b = jnp.array([3, 1, 4], jnp.int32)
    pick = lambda logits_bu, j: jnp.argmax(logits_bu, -1)

    @jax.jit
    def drafted(taps_btld):
        context = drafter.write_context(drafter.init_context(b), taps_btld, slot_bt, slot_bt)
        return drafter.draft(taps_btld[rows, root_b], y0_b, pick, None, None, context, root_b)

    def teacher(taps_btld, tokens_bk):
        inputs_bk = jnp.concatenate([y0_b[:, None], tokens_bk[:, :-1]], axis=1)
        inputs_btk = jnp.zeros((b, t, k), jnp.int32).at[rows, root_b].set(inputs_bk)
        return drafter.logits(drafter(taps_btld, inputs_btk)[rows, root_b])

    tokens_bk, logits_bku, _ = drafted(taps_btld)
    want_bku = teacher(taps_btld, tokens_bk)
    np.testing.assert_allclose(logits_bku, want_bku, atol=1e-5)
    np.testing.assert_array_equal(tokens_bk, want_bku.argmax(-1))
    noise = jax.random.normal(jax.random.key(2), taps_btld.shape[2:])
    future = teacher(taps_btld.at[:, t - 1].set(noise), tokens_bk)  # after every root
    np.testing.assert_allclose(future, want_bku, atol=1e-5)
    past = teacher(taps_btld.at[:, 2].set(noise), tokens_bk)  # before the roots 4 and 7
    assert np.abs(past - want_bku)[1:].min(axis=-1).max() > 1e-3
    np.testing.assert_allclose(past[0], want_bku[0], atol=1e-5)


def test_a_rows_past_read_from_its_own_taps_equals_the_longer_row():
    """Teacher forcing on a row's last T - c positions with the first c positions' taps given
    as its past (right-aligned behind invalid slots) equals teacher forcing on the whole row."""
    b, t, c, pad = 2, 9, 5, 3
    drafter = _system("transformer", context=True).drafter
    taps_btld = jax.random.normal(jax.random.key(1), (b, t, len(MAIN.taps), MAIN.d_model))
    inputs_btk = jax.random.randint(jax.random.key(2), (b, t, 4), 0, MAIN.vocab_size)
    junk = jax.random.normal(jax.random.key(3), (b, pad, *taps_btld.shape[2:]))
    past = Past(
        jnp.concatenate([junk, taps_btld[:, :c]], axis=1),
        jnp.arange(pad + c)[None, :].repeat(b, 0) >= pad,
    )
    window = drafter(taps_btld[:, c:], inputs_btk[:, c:], past=past)
    np.testing.assert_allclose(window, drafter(taps_btld, inputs_btk)[:, c:], atol=1e-5)


def test_a_draft_trees_accepted_path_moves_in_the_context_cache_too():
    system = _system("transformer", context=True)
    tokens_bt = jnp.asarray(np.random.default_rng(0).integers(0, MAIN.vocab_size, (2, 6)))
    _, _, cache = system.main_pass(tokens_bt, jnp.zeros((2,), jnp.int32), system.init_cache(2))
    src_bn, dst_bn = jnp.array([[3, 5], [2, 4]]), jnp.array([[1, 2], [1, 2]])
    moved = system.move_slots(cache, src_bn, dst_bn)
    for old, new in zip(cache.context, moved.context, strict=True):
        for b in range(2):
            np.testing.assert_array_equal(new["k"][b, :, dst_bn[b]], old["k"][b, :, src_bn[b]])
            np.testing.assert_array_equal(new["v"][b, :, dst_bn[b]], old["v"][b, :, src_bn[b]])


def test_only_the_transformer_drafter_reads_the_context():
    with pytest.raises(UserError, match=r"drafter.context: only the transformer"):
        DrafterConfig(kind="medusa", context=True)


@pytest.mark.parametrize("plus_one", [False, True])
def test_copied_main_layers_start_the_drafter_as_one_more_main_layer(plus_one):
    """With `copy_layers` each drafter block is the main model's layer (same output on the same
    input) and its out norm the main model's final norm, so the shared head scores a drafter
    step as the main model scores that layer's output ((1 + w) norms as well)."""
    main = dataclasses.replace(MAIN, n_layers=3, norm_plus_one=plus_one)
    cfg = DrafterConfig(k=4, n_layers=2, head="shared", copy_layers=(-1, 1))
    system = MTPSystem(main, cfg, pad_id=0, rngs=nnx.Rngs(0))
    for i, block in enumerate(system.main.blocks):  # every layer and norm told apart
        shift = 0.1 * (i + 1)
        nnx.update(block, jax.tree.map(lambda x, s=shift: x + s, nnx.state(block, nnx.Param)))
    scale = system.main.final_norm.scale
    scale[...] = jax.random.normal(jax.random.key(3), scale.shape)
    system.copy_main_layers()
    x_btd = jax.random.normal(jax.random.key(1), (2, 5, main.d_model))
    slot_bt = jnp.broadcast_to(jnp.arange(5), (2, 5))
    for block, i in zip(system.drafter.blocks, (2, 1), strict=True):
        want_btd, _ = system.main.blocks[i](x_btd, slot_bt)
        got_btd, _ = block(x_btd, slot_bt)
        np.testing.assert_allclose(got_btd, want_btd, atol=1e-6)
    np.testing.assert_allclose(
        system.drafter.logits(x_btd, system.tables()), system.main.logits(x_btd), atol=1e-5
    )
