"""``fastseq bench`` on the tiny grid: every suite runs from the command line, and the JSON,
the Markdown table and the plot are written with the documented fields; every case is timed
for fastseq and at least one baseline under the same case string; no suite reports an error."""
import json
import os

import pytest
from conftest import checkout_bench

from fastseq.bench import suites
from fastseq.cli import main

FIELDS = {"suite", "case", "impl", "dtype", "median_ms", "min_ms", "max_ms", "n", "floor_ms"}
TOP = {"device", "driver", "torch", "triton", "cuda", "commit", "date", "command", "ceilings", "records"}
MODEL_SUITES = [s for s in suites.NAMES if s != "host"]  # host: tests/test_bench_host.py, gpu_check dry run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    code = main(["bench", "--grid", "tiny", "--device", "cpu", "--suite", *MODEL_SUITES, "--rounds", "2",
                 "--warmup", "1", "--tag", "ci", "--out", str(out)])
    (path,) = out.glob("cpu-*-ci.json")
    return code, json.loads(path.read_text()), out


def test_every_suite_writes_records_with_the_documented_fields(tiny):
    code, result, out = tiny
    assert code == 0
    assert TOP <= set(result), sorted(TOP - set(result))
    assert result["errors"] == [], result["errors"]
    assert set(result["ceilings"]) == {"copy_GBps", "matmul_fp32_TFLOPs", "matmul_bf16_TFLOPs"}
    assert all(v > 0 for v in result["ceilings"].values())
    assert result["command"].startswith("fastseq bench --grid tiny")
    for r in result["records"]:
        assert FIELDS <= set(r), r
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["n"] == 2, r
        assert r["floor_ms"] is None or r["floor_ms"] > 0, r
    assert {r["suite"] for r in result["records"]} == set(MODEL_SUITES)
    stem = next(out.glob("cpu-*-ci.json")).stem
    table = (out / f"{stem}.md").read_text()
    assert all(f"## {s}" in table for s in MODEL_SUITES)
    assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_each_case_compares_fastseq_with_a_baseline(tiny):
    _, result, _ = tiny
    impls = {}
    for r in result["records"]:
        impls.setdefault((r["suite"], r["case"], r["dtype"]), set()).add(r["impl"])
    assert impls
    for key, names in impls.items():
        assert any(n.startswith("fastseq-") for n in names), key
        assert any(not n.startswith("fastseq-") for n in names), key
        assert "fastseq-reference" in names, key  # every backend available on the device is timed
    layer = {k[1] for k in impls if k[0] == "layer"}
    assert "gru-fwdbwd-B4-H32-T8-bi-packed" in layer and "lstm-fwd-B4-H32-T8-uni-dense" in layer


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--suite", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--rounds: expected >= 1, got 0"):
        main(["bench", "--rounds", "0", "--grid", "tiny", "--suite", "cell"])


def test_step_model_uses_the_tiles_pick_blocks_chooses_and_they_minimise_its_l2_term():
    """bench/step_model.py (bench/NOTES.md v0.7's table): positive times, the GPU tile
    choice, and no other candidate tile with a smaller modelled L2 time."""
    checkout_bench()
    from fastseq.bench import step_model
    from fastseq.ops import triton_utils as tu

    for kind in ("gru", "lstm"):
        for B, H in ((1, 256), (16, 768), (64, 1024), (256, 512)):
            m = step_model.step(kind, B, H)
            blk = tu.gpu_blocks(B, H)
            assert (m["BLOCK_B"], m["BLOCK_H"]) == (blk.BLOCK_B, blk.BLOCK_H)
            assert 0 < m["l2_s"] < m["step_s"]

            def l2(bb, bh):  # pick_blocks' objective (G = 4, 2-byte elements)
                nb, nh = -(-B // bb), -(-H // bh)
                return (nb * 4 * H * H + nh * B * H) * 2 / min(tu.L2_BYTES_PER_S, nb * nh * tu.L2_BYTES_PER_S_PER_CTA)

            chosen = l2(blk.BLOCK_B, blk.BLOCK_H)
            for bb in (1, 2, 4, 8, 16, 32, 64):
                for bh in (16, 32, 64):
                    if bb <= max(1, min(B, 64)) and bb * bh <= 1024:
                        assert chosen <= l2(bb, bh) * (1 + 1e-12), (B, H, bb, bh)
    assert len(step_model.table()) == 14


def test_resident_step_model_is_the_sum_of_its_terms_on_the_plans_tiles():
    """bench/step_model.py's W-resident prediction (bench/NOTES.md): the tiles the sequence
    plan picks on a GPU, every term positive, the step their sum (the product's shared
    memory and tensor time overlap), W as a register operand strictly cheaper."""
    import torch

    checkout_bench()
    from fastseq.bench import step_model
    from fastseq.ops.recurrence import triton_sequence as ts

    for kind, G in (("gru", 3), ("lstm", 4)):
        for B, H in ((16, 512), (16, 768), (64, 512), (64, 1024)):
            m = step_model.resident_step(kind, B, H)
            assert m["picked"]["triton3.9" if ts._TRITON_AT_LEAST_3_9 else "triton3.6"] == \
                ts.resident_fits(B, H, G, torch.bfloat16, torch.device("cpu"))
            bb, bh = ts._resident_blocks(B, H, False)[:2]
            kp, ctas = 1 << (H - 1).bit_length(), -(-B // bb) * -(-H // bh)
            assert (m["BLOCK_B"], bh, m["KP"], m["ctas"]) == (bb, 16, kp, ctas)
            terms = [m[k] for k in ("barrier_s", "l2_s", "smem_s", "mma_s", "gates_s")]
            assert all(x > 0 for x in terms)
            product = max(m["smem_s"], m["mma_s"])
            assert m["step_s"] == pytest.approx(m["barrier_s"] + m["l2_s"] + product + m["gates_s"])
            r = step_model.resident_step(kind, B, H, w_in_registers=True)
            assert r["smem_s"] < m["smem_s"] and r["step_s"] < m["step_s"]
    assert len(step_model.resident_table()) == 14


def test_mma_step_model_is_the_sum_of_its_terms_on_the_plans_blocks():
    """bench/step_model.py's prediction for the CUDA tensor-core persistent kernel
    (bench/NOTES.md v0.9, v0.14): the plan's default split (one row tile and the fewest blocks
    of at most 32 / G units up to 32 padded rows; above, row tiles of 32 with blocks of at most
    64 / G units within the SMs; m-tiles holding G x units rows, 8 warps over the k-tiles), every
    term positive, the step their sum, cheaper than the W-in-shared-memory kernel, and the
    batch split cheaper than the one-tile layout where it applies."""
    checkout_bench()
    from fastseq.bench import step_model

    for kind, G in (("gru", 3), ("lstm", 4)):
        for B, H in ((1, 16), (16, 512), (16, 768), (64, 1024), (5, 1000)):
            m = step_model.mma_step(kind, B, H)
            tiles = m["row_tiles"]
            per_tile = m["ctas"] // tiles
            assert tiles == (2 if B == 64 else 1) and m["ctas"] == tiles * per_tile <= step_model.SMS
            assert m["units"] <= (64 if tiles > 1 else 32) // G
            assert per_tile * m["units"] >= H > (per_tile - 1) * m["units"]
            assert tiles * m["rows_per_tile"] >= B and m["rows_per_tile"] % 16 == 0
            assert 16 * m["m_tiles"] >= G * m["units"] > 16 * (m["m_tiles"] - 1)
            kt = -(-H // 16)
            assert m["warps"] <= 8 and m["warps"] * m["k_tiles_per_warp"] >= kt
            terms = [m[k] for k in ("barrier_s", "l2_s", "mma_s", "smem_s", "gates_s")]
            assert all(x > 0 for x in terms)
            assert m["step_s"] == pytest.approx(sum(terms))
            if B == 16 and H in (512, 768):
                assert m["step_s"] < step_model.resident_step(kind, B, H)["step_s"]
            one = step_model.mma_step(kind, B, H, split_batch=False)
            assert one["row_tiles"] == 1 and one["units"] <= 32 // G
            if tiles > 1:  # the batch split reads fewer rows of h per block: a smaller L2 term
                assert m["h_op_bytes"] * tiles == one["h_op_bytes"] and m["step_s"] < one["step_s"]
            else:
                assert m == one
    assert step_model.mma_step("lstm", 20, 64, row_tiles=3)["row_tiles"] == 2  # 32 rows: no empty tile
    assert len(step_model.mma_table()) == 14


def test_mma_tagged_step_model_trades_the_barrier_for_bytes():
    """bench/step_model.py's tagged-exchange forward (bench/NOTES.md v0.15): blocks of at most
    32 / G units; the wait TAGGED_WAIT_S instead of the grid barrier; the h operand read as 32-bit
    words (twice the grid kernel's bytes on the same blocks) and staged through shared memory;
    the step the sum of its terms; cheaper than the grid kernel only where h is small. And the
    cuDNN figure the tables compare with is the published one less the input projection."""
    checkout_bench()
    from fastseq.bench import step_model

    for kind, G in (("gru", 3), ("lstm", 4)):
        for B, H in ((8, 512), (16, 256), (16, 768), (16, 1024)):
            t, g = step_model.mma_step(kind, B, H, tagged=True), step_model.mma_step(kind, B, H)
            assert G * t["units"] <= 32 and t["barrier_s"] == step_model.TAGGED_WAIT_S < g["barrier_s"]
            assert (t["ctas"], t["h_op_bytes"]) == (g["ctas"], 2 * g["h_op_bytes"])
            assert t["smem_s"] > g["smem_s"]
            terms = [t[k] for k in ("barrier_s", "l2_s", "mma_s", "smem_s", "gates_s")]
            assert t["step_s"] == pytest.approx(sum(terms))
        assert step_model.mma_step(kind, 16, 256, tagged=True)["step_s"] < step_model.mma_step(kind, 16, 256)["step_s"]
        assert step_model.mma_step(kind, 16, 768, tagged=True)["step_s"] > step_model.mma_step(kind, 16, 768)["step_s"]
    assert step_model.CUDNN_LSTM_B16_H768_S == pytest.approx(2.01e-3 / 1024 - step_model.CUDNN_PROJECTION_S)
    assert step_model.CUDNN_LSTM_B16_H768_BWD_S == pytest.approx(3.18e-3 / 1024 - 3 * step_model.CUDNN_PROJECTION_S)
    assert len(step_model.mma_tagged_table()) == 18


def test_step_model_inputs_loaded_ahead_of_the_product():
    """bench/step_model.py (bench/NOTES.md v0.16, v0.17): the kernels load the step inputs that
    do not depend on the product ahead of it, so their gate term is GATE_MATH_S where each thread
    has at most the prefetched number of elements and the product phase hides INPUT_LOAD_S, and
    GATES_S (v0.15's, the inputs loaded after the product) where it has more or the kernel loads
    none ahead (the tagged kernels with 8 k-tiles per warp); GATES_S is the sum of the two parts."""
    checkout_bench()
    from fastseq.bench import step_model as m

    assert m.GATES_S == pytest.approx(m.INPUT_LOAD_S + m.GATE_MATH_S) and m.GATE_MATH_S > 0
    assert m.epilogue_s(256 * 3, 3, 1e-6) == pytest.approx(m.GATE_MATH_S)
    assert m.epilogue_s(256 * 3 + 1, 3, 1e-6) == m.GATES_S  # a 4th element per thread: loaded after
    assert m.epilogue_s(10, 0, 1e-6) == m.GATES_S
    assert m.epilogue_s(10, 3, 0.1e-6) == pytest.approx(m.GATE_MATH_S + m.INPUT_LOAD_S - 0.1e-6)
    for kind in ("gru", "lstm"):
        for B, H in ((16, 512), (16, 768), (64, 768)):
            new, old = m.mma_step(kind, B, H), m.mma_step(kind, B, H, prefetch=False)
            assert old["gates_s"] == m.GATES_S and new["gates_s"] == pytest.approx(m.GATE_MATH_S)
            assert old["step_s"] - new["step_s"] == pytest.approx(m.INPUT_LOAD_S)
            for f in (m.mma_backward_step, m.mma_cluster_backward_step):
                new, old = f(kind, B, H), f(kind, B, H, prefetch=False)
                assert old["gates_s"] == m.GATES_S and new["gates_s"] == pytest.approx(m.GATE_MATH_S)
            # v0.17: the Triton per-step and W-resident forwards load every element's inputs ahead.
            for f in (m.step, m.resident_step):
                new, old = f(kind, B, H), f(kind, B, H, prefetch=False)
                assert old["gates_s"] == m.GATES_S and new["gates_s"] == pytest.approx(m.GATE_MATH_S)
                assert old["step_s"] - new["step_s"] == pytest.approx(m.INPUT_LOAD_S)
        # 16 units x 80 rows of one tile: 5 elements per thread, past the 3 loaded ahead.
        assert m.mma_step(kind, 72, 16, row_tiles=1)["gates_s"] == m.GATES_S
        # The tagged kernels with 8 k-tiles per warp load nothing ahead (registers), those with 4 do.
        assert m.mma_step(kind, 16, 1024, tagged=True)["gates_s"] == m.GATES_S
        assert m.mma_step(kind, 16, 512, tagged=True)["gates_s"] == pytest.approx(m.GATE_MATH_S)
    # At the one size with a published cuDNN figure, the model's verdict (a prediction):
    fwd, bwd = m.mma_step("lstm", 16, 768)["step_s"], m.mma_cluster_backward_step("lstm", 16, 768)["step_s"]
    assert fwd / m.CUDNN_LSTM_B16_H768_S == pytest.approx(0.89, abs=0.01)
    assert bwd / m.CUDNN_LSTM_B16_H768_BWD_S == pytest.approx(0.90, abs=0.01)


def test_ablation_summary_reads_run_logs(tmp_path):
    """bench/ablation.py: BLEU by update, the cumulative target tokens and training
    seconds at each evaluation, the first update reaching the threshold, and the
    config keys in which a run differs from the first."""
    checkout_bench()
    from fastseq.bench import ablation
    from fastseq.training.runlog import TRAIN_FIELDS, CsvLog, eval_fields

    def make(name, lr, bleus):
        run = tmp_path / name
        run.mkdir()
        train = CsvLog(run / "train_log.csv", TRAIN_FIELDS)
        for step in range(1, 5):  # 1,000 tokens per update at 500 tokens/s: 2 s each
            train.write(step=step, epoch=step / 4, loss=5.0, lr=lr, tokens=1000, tokens_per_s=500.0, elapsed_s=2.0 * step)
        train.close()
        ev = CsvLog(run / "eval_log.csv", eval_fields(("val_loss", "val_bleu")))
        for step, b in zip((2, 4), bleus):
            ev.write(step=step, epoch=step / 4, val_loss=3.0, val_bleu=b, lr=lr, elapsed_s=3.0 * step)
        ev.close()
        (run / "metrics.json").write_text(json.dumps({"config": {"lr": lr, "out": str(run), "model": {"dropout": 0.2}}}))
        return run

    a, b = make("a", 0.002, (10.0, 20.0)), make("b", 0.004, (22.0, 26.0))
    ra, rb = ablation.summarise_run(a, 25.0), ablation.summarise_run(b, 25.0)
    assert [p["target_tokens"] for p in rb["evaluations"]] == [2000, 4000]
    assert [p["train_s"] for p in rb["evaluations"]] == [4.0, 8.0]
    assert ra["first_val_bleu_25"] is None and rb["first_val_bleu_25"]["step"] == 4
    lines = ablation.table([ra, rb])
    assert "not reached" in lines[2] and "lr=0.004" in lines[3] and "| 26.0 |" in lines[3]
    out = tmp_path / "res" / "abl"
    ablation.main(["--runs", str(a), str(b), "--out", str(out), "--command", "cmd"])
    assert json.loads(out.with_suffix(".json").read_text())["runs"][1]["updates"] == 4
    with pytest.raises(FileNotFoundError, match="train_log.csv"):
        ablation.summarise_run(tmp_path / "res")


def test_mma_backward_step_model_is_the_sum_of_its_terms_on_the_plans_blocks():
    """bench/step_model.py's prediction for the CUDA tensor-core persistent backward
    (bench/NOTES.md v0.13): the plan's default split (16-unit blocks, 8 warps over the
    k-tiles of K = G * H), every term positive, the step their sum, and a larger dG
    broadcast (L2 term) than the forward's h broadcast at the same sizes."""
    checkout_bench()
    from fastseq.bench import step_model

    for kind, G in (("gru", 3), ("lstm", 4)):
        for B, H in ((1, 16), (16, 512), (16, 768), (64, 1024), (5, 1000)):
            m = step_model.mma_backward_step(kind, B, H)
            assert m["units"] == min(H, 16) and m["ctas"] * m["units"] >= H > (m["ctas"] - 1) * m["units"]
            kt = -(-G * H // 16)
            assert m["warps"] <= 8 and m["warps"] * m["k_tiles_per_warp"] >= kt
            terms = [m[k] for k in ("barrier_s", "l2_s", "smem_s", "mma_s", "gates_s")]
            assert all(x > 0 for x in terms)
            assert m["step_s"] == pytest.approx(sum(terms))
            assert m["dg_op_bytes"] > step_model.mma_step(kind, B, H)["h_op_bytes"]
    assert len(step_model.mma_backward_table()) == 14


def test_mma_cluster_backward_step_model_is_the_sum_of_its_terms_on_the_plans_clusters():
    """bench/step_model.py's prediction for the cluster backward (bench/NOTES.md v0.14): the
    plan's auto cluster size (the largest of 8 / 4 / 2 at most the 16-unit block count), a grid
    that is a multiple of it, each rank's k-tiles covering K = G * H, every term positive and the
    step their sum; the dG slice 1 / cluster of the block kernel's operand (to the padding), and
    the block kernel's model where no cluster forms (H <= 16)."""
    checkout_bench()
    from fastseq.bench import step_model

    assert [step_model.cluster_size(H) for H in (16, 17, 40, 64, 100, 128, 768)] == [1, 2, 2, 4, 4, 8, 8]
    for kind, G in (("gru", 3), ("lstm", 4)):
        for B, H in ((16, 40), (16, 512), (16, 768), (64, 1024), (5, 1000)):
            m = step_model.mma_cluster_backward_step(kind, B, H)
            old = step_model.mma_backward_step(kind, B, H)
            size = m["cluster"]
            assert size == step_model.cluster_size(H) > 1 and m["ctas"] % size == 0
            assert m["ctas"] * 16 >= H and m["m_tiles"] == size
            assert m["k_tiles_per_rank"] * size >= -(-G * H // 16) > (m["k_tiles_per_rank"] - 1) * size
            terms = [m[k] for k in ("barrier_s", "l2_s", "smem_s", "mma_s", "cluster_barrier_s", "dsmem_s", "gates_s")]
            assert all(x > 0 for x in terms)
            assert m["step_s"] == pytest.approx(sum(terms))
            assert m["dg_slice_bytes"] * size == pytest.approx(old["dg_op_bytes"], rel=0.1)
    tiny = step_model.mma_cluster_backward_step("gru", 4, 16)
    assert tiny["cluster"] == 1 and tiny["step_s"] == step_model.mma_backward_step("gru", 4, 16)["step_s"]
    assert len(step_model.mma_cluster_backward_table()) == 14


def test_layer_suite_persistent_setting_and_environment(monkeypatch):
    """The layer suite's FASTSEQ_BENCH_PERSISTENT (0 / unset, 1, only; anything else raises
    naming it) and its environment() block, which sets variables for the block and restores
    (or removes) them after, also when the block raises."""
    checkout_bench()
    from fastseq.bench.suites import layer

    monkeypatch.delenv("FASTSEQ_BENCH_PERSISTENT", raising=False)
    assert layer.persistent_mode() == "0"
    for value in ("1", "only"):
        monkeypatch.setenv("FASTSEQ_BENCH_PERSISTENT", value)
        assert layer.persistent_mode() == value
    monkeypatch.setenv("FASTSEQ_BENCH_PERSISTENT", "yes")
    with pytest.raises(ValueError, match="FASTSEQ_BENCH_PERSISTENT"):
        layer.persistent_mode()
    monkeypatch.setenv("FASTSEQ_CUDA_PERSISTENT", "0")
    monkeypatch.delenv("FASTSEQ_CUDA_PERSISTENT_CLUSTER", raising=False)
    with pytest.raises(KeyError):
        with layer.environment({"FASTSEQ_CUDA_PERSISTENT": "1", "FASTSEQ_CUDA_PERSISTENT_CLUSTER": "8"}):
            assert os.environ["FASTSEQ_CUDA_PERSISTENT"] == "1"
            assert os.environ["FASTSEQ_CUDA_PERSISTENT_CLUSTER"] == "8"
            raise KeyError("inside")
    assert os.environ["FASTSEQ_CUDA_PERSISTENT"] == "0"
    assert "FASTSEQ_CUDA_PERSISTENT_CLUSTER" not in os.environ



def test_sync_suite_grid_and_cpu():
    """The CUDA-only `sync` suite: not in a default run; its quick grid fits the device's SMs
    (blocks rounded down to the cluster size, duplicates dropped), each block's words are a
    multiple of 4 covering the bytes asked for; on a CPU it raises instead of timing nothing.
    (Its kernel and its case: tests/test_cuda_compile.py, under the host emulation.)"""
    import torch

    from fastseq.bench import run as bench_run
    from fastseq.bench.core import Context, Grid
    from fastseq.bench.suites import sync

    assert "sync" not in suites.NAMES and "sync" in suites.CUDA_ONLY
    assert suites.load("sync") is sync
    for sms in (132, 60):
        cases = sync.grid(Context(device=torch.device("cpu"), dtypes=[torch.float32], grid=Grid("quick")), sms)
        assert len({(b, n, c) for b, n, _, c in cases}) == len(cases)
        for blocks, nbytes, steps, cluster in cases:
            assert 0 < blocks <= sms and blocks % cluster == 0 and steps == 1024
            words = sync.words_per_block(blocks, nbytes)
            assert words % 4 == 0 and 4 * words * blocks >= nbytes
        assert (sms, sms * 16, 1024, 1) in cases and (96 if sms >= 96 else 56, 96 * 16, 1024, 8) in cases
    assert sync.case_name(96, 24 * 1024, 1024, 1) == "sync-blocks96-24KB-T1024"
    assert sync.checksum(2, 4, 2) == 4 * (1 + 2 + 3 + 4)
    ctx = Context(device=torch.device("cpu"), dtypes=[torch.float32], grid=Grid("tiny"))
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        sync.run(ctx)
    assert bench_run.build_parser().parse_args(["--suite", "sync"]).suite == ["sync"]
    assert bench_run.build_parser().parse_args([]).suite == list(suites.NAMES)
