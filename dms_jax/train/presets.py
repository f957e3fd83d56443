"""Named retrofit recipes (``python -m experiments.distill --preset NAME``) and the CLI's defaults.

Each preset records why its numbers are what they are; the results files under docs/results/ hold what it gave.
"""

PRESETS = {
    # What fits ~60 minutes of this 2-core CPU for SmolLM2-135M (see docs/results/retrofit_smollm2.json).
    # The adapter starts exactly at "evict nothing" (KL 0); zeroing a borrowed neuron costs ~0.25 nats of KL at
    # step 0 on SmolLM2, more than a short CPU run can win back.
    # A quarter of the rows are synthetic recall rows (dms_jax.data.synthetic.make_recall_rows): trained on Python's
    # docs alone, the retrofit reached CR 6.2 but evicted passkeys (0/30 retrieved; docs/results/README.md).
    "cpu": dict(steps=200, batch_size=4, grad_accum=1, seq_len=256, window=64, cr_final=4.5, cr_final_step=150,
                lr=1e-4, trainable="all", variant="adapter", checkpoint_every=40, eval_seqs=16, eval_seq_len=2048,
                passkey_cases=30, passkey_lengths="1024,2048", recall_fraction=0.25),
    # DMC (merge-based predecessor) on the same CPU budget and data as "cpu": 200 steps of 4 x 256 tokens, a quarter
    # recall rows, target CR 4.5 at step 150 as there (cr_final_step counts from the end of the neuron-decay stage,
    # so 150 - 20 = 130), then 50 steps at 4.5. Neuron decay: the reference gives it a run of its own; here 20 steps
    # (10%, the CLI default): the borrowed q/k neurons fall to 0 over 16 of them, 4 more train at 0, then the weights
    # are zeroed. DMC borrows element d-1 of every q and k head (DMS one q head per group): on SmolLM2, zeroing them at
    # step 0 costs 0.64 nats of KL, after the 20 decay steps the first compression step starts at ~0.17 (steps 17-20
    # at scale 0: 0.11-0.16), while 20 steps still leave 130 for the CR ramp.
    # Merge logit 100 * k[d-1] - 3 (the reference: 1 * k[d-1] - 5). Unscaled, two runs never left "append
    # everything": at -5 only ~0.7% of the logistic noise reaches the decision boundary, and each borrowed weight
    # moves ~lr per step under Adam. A 40-step probe with scale 100 (offset 5) left the noise floor and was still
    # speeding up (merge fraction 0.007 -> 0.08 in 30 steps); offset 3 starts where the gradient is 7x larger.
    "cpu-dmc": dict(method="dmc", neuron_decay_steps=20, steps=200, batch_size=4, grad_accum=1, seq_len=256,
                    cr_final=4.5, cr_final_step=130, lr=1e-4, trainable="all", checkpoint_every=40, eval_seqs=16,
                    eval_seq_len=2048, passkey_cases=30, passkey_lengths="1024,2048", recall_fraction=0.25,
                    dmc_logit_scale=100.0, dmc_offset=3.0),
    # Recipe v3 (docs/results/retrofit_smollm2_v3.json): rows as long as the evaluation's prompts (1K tokens), half
    # of them long-range rows (dms_jax.data.synthetic: facts and variable chains in many wordings, asked for
    # 128+ tokens later), CR 1 -> 8 at 100 steps per unit of CR, milestones at every whole CR. Only the decision
    # adapter trains (frozen base, as in the public reference recipe): the all-weights v2 retrofit kept its
    # accuracy on one prompt wording and lost it on others, and a frozen base cannot drift from the original.
    # Several hours on 2 cores: run it in the background and continue it with --resume.
    "cpu-v3": dict(steps=760, batch_size=2, grad_accum=1, seq_len=1024, window=64, cr_final=8.0, cr_final_step=700,
                   lr=1e-4, trainable="adapter", variant="adapter", checkpoint_every=10, eval_seqs=8,
                   eval_seq_len=2048, passkey_cases=0, passkey_lengths="1024,2048", recall_fraction=0.5,
                   synthetic_kind="longrange", compute_dtype="float32", remat=False),
    # Recipe v4: v3 with the long-range rows' question blocks weighing 10x in the KL (in a 1K row the ~10 answer
    # tokens that need a far statement otherwise carry ~1% of the loss), continued from v3's CR-4 milestone (step
    # 300, whole-cache 3.39 measured; --warm-start) at the same schedule point (1 -> 5 over 400 steps is 4.0 at
    # step 300), to CR 5 at step 400, then 100 steps held there.
    "cpu-v4": dict(steps=500, batch_size=2, grad_accum=1, seq_len=1024, window=64, cr_final=5.0, cr_final_step=400,
                   lr=1e-4, trainable="adapter", variant="adapter", checkpoint_every=10, eval_seqs=8,
                   eval_seq_len=2048, passkey_cases=0, passkey_lengths="1024,2048", recall_fraction=0.5,
                   synthetic_kind="longrange", compute_dtype="float32", remat=False, answer_weight=10.0),
    # Recipe "lowrank" (issue 17: a retrofit that ships in a few MB): a frozen base whose attention and MLP
    # projections change only by rank-4 products (dms_jax.lowrank), trained with the decision adapter on v3's data.
    # All-weights v6 (trainable all) repairs more than the adapter alone, but its change is neither sparse nor
    # low-rank after the fact; trained low-rank from the start it ships as ~1.2M float16 factors (~2.5 MB) plus the
    # adapter. Continued from the shipped v3 adapter (--init-adapter) at CR 4, to 6 at step 200, then held.
    # Attempt 1 (factors at PEFT's initial range): at step 100 they had moved the weights by 0.04% (median relative
    # norm) where all-weights v6 had moved them by 0.14%, and it scored below v6 (docs/results/README.md); the
    # factors now start 4x wider, so the product grows ~4x faster under Adam.
    "cpu-lowrank": dict(steps=240, batch_size=2, grad_accum=1, seq_len=1024, window=64, cr_initial=4.0, cr_final=6.0,
                        cr_final_step=200, lr=1e-4, trainable="adapter", lowrank=4, lowrank_init_scale=4.0,
                        variant="adapter",
                        checkpoint_every=20, eval_seqs=8, eval_seq_len=2048, passkey_cases=0,
                        passkey_lengths="1024,2048", recall_fraction=0.5, synthetic_kind="longrange",
                        compute_dtype="float32", remat=False),
    # The README demo: a few minutes end to end.
    "demo": dict(steps=30, batch_size=2, grad_accum=1, seq_len=128, window=32, cr_final=3.0, cr_final_step=20,
                 lr=1e-4, trainable="all", variant="adapter", checkpoint_every=10, eval_seqs=4, eval_seq_len=512,
                 passkey_cases=4, passkey_lengths="512", recall_fraction=0.25),
    # Tests: seconds.
    "tiny": dict(steps=6, batch_size=2, grad_accum=1, seq_len=32, window=4, cr_final=2.0, cr_final_step=4,
                 lr=1e-3, trainable="all", checkpoint_every=2, eval_seqs=2, eval_seq_len=64, passkey_cases=0,
                 passkey_lengths="512"),
}
DEFAULTS = dict(steps=300, batch_size=4, grad_accum=1, seq_len=256, window=256, cr_final=4.0, cr_final_step=None,
                variant="neuron", method="dms", dmc_logit_scale=1.0, dmc_offset=5.0,
                lr=3e-5, trainable="all", checkpoint_every=50, eval_seqs=16, eval_seq_len=2048, passkey_cases=0,
                passkey_lengths="1024,2048", recall_fraction=0.0, synthetic_kind="recall", compute_dtype="bfloat16",
                remat=True, answer_weight=1.0, lowrank=0, lowrank_init_scale=1.0, cr_initial=1.0)
