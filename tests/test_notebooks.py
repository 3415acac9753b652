"""Execute the teaching notebooks in smoke mode and check the values they display.

Each notebook runs in a fresh ``python3`` kernel with ``BAYESHEAD_NOTEBOOK_SMOKE=1`` and its own
folder as the working directory, as Jupyter runs it. The executed copy stays in memory, so the
files keep the outputs of their full run.
"""

from __future__ import annotations

import math
import re

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import REPO_ROOT

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
# Maximum seconds one cell may run. In smoke mode the longest cell trains two tiny CNNs in
# seconds, and the margin covers a machine busy with other work.
CELL_TIMEOUT_S = 900
TWO_MODELS = {"CNN (cross-entropy)", "CNN + Bayesian head (SVI)"}


def execute(name: str, monkeypatch, tmp_path) -> nbformat.NotebookNode:
    """Run every cell of ``notebooks/<name>`` in smoke mode and return the executed notebook."""
    monkeypatch.setenv("BAYESHEAD_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("BAYESHEAD_NOTEBOOK_OUT", str(tmp_path / "runs"))
    monkeypatch.delenv("BAYESHEAD_MRI_RUN", raising=False)
    # The smoke-mode models are tiny, and one torch thread runs them faster than several threads
    # that wait for busy cores (notebook 1 took 9 s against 48 s on the 2-core container).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()
    return notebook


def code_outputs(notebook) -> list:
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]


def printed_text(notebook) -> str:
    """Everything the code cells printed to stdout, in order."""
    return "".join(o.text for o in code_outputs(notebook) if o.output_type == "stream" and o.name == "stdout")


def printed_number(notebook, prefix: str) -> float:
    """The number printed right after ``prefix``."""
    match = re.search(re.escape(prefix) + r"\s*([-+0-9.eE]+|nan|inf)", printed_text(notebook))
    assert match is not None, f"no output line contains {prefix!r}"
    return float(match.group(1))


def markdown_table(notebook, first_header: str) -> dict[str, dict[str, str]]:
    """Parse the first Markdown table output whose first header cell is ``first_header``.

    Returns ``{first cell of a row: {column header: cell text}}``.
    """
    for output in code_outputs(notebook):
        text = output.get("data", {}).get("text/markdown")
        if not text:
            continue
        lines = [line for line in text.splitlines() if line.startswith("|")]
        header = [cell.strip() for cell in lines[0].strip("|").split("|")]
        if header[0] != first_header:
            continue
        rows = {}
        for line in lines[2:]:
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows[cells[0]] = dict(zip(header[1:], cells[1:], strict=True))
        return rows
    raise AssertionError(f"no Markdown table output starts with the header {first_header!r}")


def count_images(notebook) -> int:
    return sum("image/png" in output.get("data", {}) for output in code_outputs(notebook))


def test_quickstart_metrics_and_diagrams(monkeypatch, tmp_path):
    notebook = execute("01_quickstart.ipynb", monkeypatch, tmp_path)

    table = markdown_table(notebook, "model")
    assert set(table) == TWO_MODELS
    for row in table.values():
        assert 0 <= float(row["accuracy"]) <= 1
        assert 0 <= float(row["ECE"]) <= 1
        assert 0 <= float(row["MCE"]) <= 1
        assert 0 <= float(row["NLL"]) < math.inf
        assert 0 <= float(row["Brier"]) <= 2
    # Reloading the checkpoints and predicting with the run's seed reproduces the report.
    assert printed_number(notebook, "largest difference between recomputed and stored metrics:") <= 1e-9

    bootstrap = markdown_table(notebook, "measure")
    assert set(bootstrap) == {"accuracy", "ECE", "NLL", "Brier"}
    for row in bootstrap.values():
        low, high = (float(x) for x in re.findall(r"[-+][0-9.]+", row["Bayesian minus CNN, 95% bootstrap interval"]))
        assert low <= high
    # Side-by-side reliability diagrams, entropy histograms, most uncertain digits.
    assert count_images(notebook) == 3


def test_priors_and_guides_table(monkeypatch, tmp_path):
    notebook = execute("02_priors_and_guides.ipynb", monkeypatch, tmp_path)

    # The hand-written Pyro model and BayesianLinearHead.model give the same log joint.
    assert printed_number(notebook, "absolute difference:") < 1e-3
    scales = re.findall(r"scale of the obs site ([0-9.]+)", printed_text(notebook))
    assert [float(s) for s in scales] == [1000 / 32, 1000 / 32]

    table = markdown_table(notebook, "prior, guide")
    expected = {"CNN (cross-entropy)"} | {
        f"{prior} prior, AutoNormal" for prior in ("normal", "laplace", "scale-mixture", "hierarchical")
    } | {"normal prior, AutoLowRankMultivariateNormal", "normal prior, MeanFieldGuide"}
    assert set(table) == expected
    for label, row in table.items():
        assert 0 <= float(row["accuracy"]) <= 1
        assert 0 <= float(row["ECE"]) <= 1
        assert 0 <= float(row["NLL"]) < math.inf
        if label != "CNN (cross-entropy)":
            # A sum of log predictive probabilities.
            assert float(row["elpd_loo"]) <= 0
            assert float(row["elpd_loo SE"]) >= 0

    # The DataFrame of arviz.compare, one row per head.
    comparison = next(o.data["text/plain"] for o in code_outputs(notebook) if "text/html" in o.get("data", {}))
    assert "elpd_loo" in comparison
    for label in expected - {"CNN (cross-entropy)"}:
        assert label in comparison
    assert count_images(notebook) == 2


def test_calibration_explained_values(monkeypatch, tmp_path):
    notebook = execute("03_calibration_explained.ipynb", monkeypatch, tmp_path)

    # Six predictions in 5 bins, computed by hand: confidences 0.6 and 0.55 (one correct) in
    # (0.4, 0.6], 0.8 and 0.7 (one correct) in (0.6, 0.8], 0.9 and 0.9 (both correct) in (0.8, 1].
    expected_ece = (2 * abs(0.5 - 0.575) + 2 * abs(0.5 - 0.75) + 2 * abs(1.0 - 0.9)) / 6
    true_class_probs = [0.9, 0.9, 0.2, 0.6, 0.7, 0.45]
    assert printed_number(notebook, "ECE from the bin table:") == pytest.approx(expected_ece, abs=1e-6)
    assert printed_number(notebook, "     ece:") == pytest.approx(expected_ece, abs=1e-6)
    assert printed_number(notebook, "     mce:") == pytest.approx(0.25, abs=1e-6)
    assert printed_number(notebook, "accuracy:") == pytest.approx(4 / 6, abs=1e-6)
    assert printed_number(notebook, "     nll:") == pytest.approx(-sum(map(math.log, true_class_probs)) / 6, abs=1e-6)
    assert printed_number(notebook, "   brier:") == pytest.approx((0.02 + 0.02 + 1.28 + 0.32 + 0.18 + 0.605) / 6, abs=1e-6)

    # The constant class-frequency predictor: one confidence, equal to its accuracy.
    constant = printed_text(notebook).split("the constant predictor scores:")[1]
    assert float(re.search(r"ece:\s*([0-9.]+)", constant).group(1)) <= 1e-4
    assert float(re.search(r"accuracy:\s*([0-9.]+)", constant).group(1)) <= 0.2

    methods = markdown_table(notebook, "method")
    assert len(methods) == 4
    for base in ("CNN (cross-entropy)", "CNN + Bayesian head (SVI)"):
        # Dividing the logits by T keeps their order, so the accuracy stays.
        assert methods[f"{base} + temperature"]["accuracy"] == methods[base]["accuracy"]
    assert printed_number(notebook, "for the CNN (cross-entropy): T =") > 0

    assert printed_number(notebook, "largest |predictive entropy - expected entropy - mutual information|:") <= 1e-10
    for row in markdown_table(notebook, "inputs, model, score").values():
        assert 0 <= float(row["AUROC"]) <= 1
    assert count_images(notebook) == 4


def test_medical_safety_net_with_scans(monkeypatch, tmp_path, brain_mri_root):
    monkeypatch.setenv("BAYESHEAD_DATA", str(brain_mri_root.resolve()))
    notebook = execute("04_medical_safety_net.ipynb", monkeypatch, tmp_path)

    assert printed_number(notebook, "largest difference between recomputed and stored test metrics:") <= 1e-9
    report = markdown_table(notebook, "model")
    risk = markdown_table(notebook, "model, score")
    assert set(risk) == {"CNN (cross-entropy), predictive entropy", "CNN + Bayesian head (SVI), predictive entropy",
                         "CNN + Bayesian head (SVI), mutual information"}
    for label, row in risk.items():
        model = next(name for name in TWO_MODELS if label.startswith(name))
        # Referring nothing leaves the plain test accuracy.
        assert float(row["0% referred"]) == pytest.approx(float(report[model]["accuracy"]), abs=1e-4)
        assert 0 <= float(row["AURC"]) <= 1

    stored = printed_number(notebook, "stored threshold")
    assert printed_number(notebook, "validation scans:") == stored
    assert 0 <= stored <= math.log(4) + 1e-4  # printed to 4 decimals
    for row in markdown_table(notebook, "model (each with its own threshold)").values():
        assert 0 <= float(row["referred fraction"]) <= 1

    cases = markdown_table(notebook, "scan")
    assert len(cases) == 16
    # bayeshead predict on scan files gives the probabilities of the evaluation.
    assert printed_number(notebook, "largest difference to the probabilities above:") <= 1e-6
    # Selective risk, the entropy histogram with the threshold, the stored cases image.
    assert count_images(notebook) == 3


def test_medical_safety_net_without_scans(monkeypatch, tmp_path):
    monkeypatch.setenv("BAYESHEAD_DATA", str(tmp_path / "no-data"))
    notebook = execute("04_medical_safety_net.ipynb", monkeypatch, tmp_path)

    text = printed_text(notebook)
    assert f"No brain-tumour MRI scans under {tmp_path / 'no-data' / 'brain-tumor-mri'}" in text
    assert text.count("skipped:") == 7
    assert count_images(notebook) == 0
