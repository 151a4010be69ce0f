"""Data preparation CLIs (`openrlhf_sapo.data.{geo3k,gsm8k,math}`) on fixture datasets built here.

No network: local inputs are `save_to_disk` folders, jsonl and parquet files made in the test, and
the hub path is exercised with `datasets.load_dataset` replaced by a fake. The produced rows are
then read by OpenRLHF 0.11.2's own code: `blending_datasets` (how `--data.prompt_dataset` is
loaded), `PromptDataset` (prompt/label/images, chat template with `<image>` items), `load_images`
and `process_prompt_with_images` with a tiny Qwen2-VL processor built offline.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
from datasets import Dataset, DatasetDict, Features, Image, List, Value
from PIL import Image as PILImage

from openrlhf_sapo.data import common, geo3k, gsm8k
from openrlhf_sapo.data import math as math_prep
from openrlhf_sapo.data.common import DEFAULT_INSTRUCTION

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GEO_FEATURES = Features({"images": List(Image()), "problem": Value("string"), "answer": Value("string")})
datasets.disable_progress_bars()  # keep captured stderr to our own messages

ROW_KEYS = ["prompt", "label", "images", "answer_type", "datasource", "source", "id"]


def _image(w: int, h: int, seed: int) -> PILImage.Image:
    rng = np.random.default_rng(seed)
    return PILImage.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


def _pixels(img) -> np.ndarray:
    if isinstance(img, (str, bytes)):
        img = PILImage.open(io.BytesIO(img) if isinstance(img, bytes) else img)
    return np.asarray(img.convert("RGB"))


def _read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _run(module, argv, capsys):
    rc = module.main([*argv, "--no-progress"])
    out, err = capsys.readouterr()
    return rc, out, err


def _counts(out: str, split: str) -> tuple[int, ...]:
    m = re.search(rf"^{split}\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)$", out, re.MULTILINE)
    assert m, f"no counts line for {split!r} in:\n{out}"
    return tuple(int(x) for x in m.groups())


# Geo3K-like fixtures: (image, problem, answer); sizes are multiples of 28 (one vision token per 28x28).
GEO_SPLITS = {
    "train": [
        ([_image(56, 28, 0)], "<image>Find x.", "3"),
        ([_image(28, 28, 1)], "In the figure, <image> find the area.", "2\\sqrt{3}"),
        ([_image(28, 56, 2)], "<image>Which choice is right?", "B"),
    ],
    "validation": [([_image(28, 28, 3)], "<image>Find y.", "12.5")],
    "test": [
        ([_image(56, 56, 4)], "<image>Find the perimeter.", "1,024"),
        ([_image(28, 28, 5)], "<image>Find z.", "x+1"),
    ],
}


def _geo_dict(rows) -> dict:
    return {"images": [r[0] for r in rows], "problem": [r[1] for r in rows], "answer": [r[2] for r in rows]}


@pytest.fixture(scope="module")
def geo_disk(tmp_path_factory):
    path = tmp_path_factory.mktemp("geo_src") / "geometry3k"
    DatasetDict(
        {s: Dataset.from_dict(_geo_dict(rows), features=GEO_FEATURES) for s, rows in GEO_SPLITS.items()}
    ).save_to_disk(str(path))
    return str(path)


@pytest.fixture(scope="module")
def geo_out(geo_disk, tmp_path_factory):
    out = tmp_path_factory.mktemp("geo_out")
    rc = geo3k.main(["--from-disk", geo_disk, "--output-dir", str(out), "--no-progress"])
    assert rc == 0
    return out


# ---------------------------------------------------------------------------------------------
# Geo3K


def test_geo3k_from_save_to_disk(geo_disk, tmp_path, capsys):
    out = tmp_path / "out"
    rc, stdout, stderr = _run(geo3k, ["--from-disk", geo_disk, "--output-dir", str(out)], capsys)
    assert rc == 0, stderr
    assert sorted(os.listdir(out)) == ["images", "test.jsonl", "train.jsonl", "validation.jsonl"]
    for split, fixture in GEO_SPLITS.items():
        rows = _read_jsonl(out / f"{split}.jsonl")
        assert len(rows) == len(fixture)
        assert _counts(stdout, split) == (len(fixture), len(fixture), 0, 0)
        for i, (row, (images, problem, answer)) in enumerate(zip(rows, fixture)):
            assert list(row) == ROW_KEYS
            assert row["prompt"] == problem + " " + DEFAULT_INSTRUCTION  # tag kept where it was
            assert row["label"] == answer
            assert row["id"] == f"geo3k/{split}/{i}" and row["datasource"] == "geo3k"
            assert row["source"] == f"{os.path.abspath(geo_disk)}[{split}]"
            expected_path = os.path.join(str(out.resolve()), "images", split, f"{i}.png")
            assert row["images"] == [expected_path]
            assert Path(expected_path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            np.testing.assert_array_equal(_pixels(expected_path), _pixels(images[0]))
    types = [r["answer_type"] for s in GEO_SPLITS for r in _read_jsonl(out / f"{s}.jsonl")]
    assert types == ["number", "expression", "choice", "number", "number", "expression"]
    flags = "--data.input_key prompt --data.label_key label --data.image_key images --data.max_images_per_prompt 1"
    assert flags + " --data.apply_chat_template" in stdout
    assert f"--data.prompt_dataset {out.resolve() / 'train.jsonl'}" in stdout
    assert f"--eval.dataset {out.resolve() / 'test.jsonl'}" in stdout
    assert f"# other eval split(s): {out.resolve() / 'validation.jsonl'}" in stdout


def test_geo3k_instruction_override_and_datasource(geo_disk, tmp_path, capsys):
    argv = ["--from-disk", geo_disk, "--output-dir", str(tmp_path), "--splits", "validation"]
    rc, _, err = _run(
        geo3k, [*argv, "--instruction", "Answer in \\boxed{}.", "--instruction-sep", "\n", "--datasource", "g"], capsys
    )
    assert rc == 0, err
    assert os.listdir(tmp_path / "images") == ["validation"] and not (tmp_path / "train.jsonl").exists()
    (row,) = _read_jsonl(tmp_path / "validation.jsonl")
    assert row["prompt"] == "<image>Find y.\nAnswer in \\boxed{}." and row["datasource"] == "g"
    rc, _, err = _run(geo3k, [*argv, "--overwrite", "--instruction", ""], capsys)
    assert rc == 0, err
    assert _read_jsonl(tmp_path / "validation.jsonl")[0]["prompt"] == "<image>Find y."
    rc, _, err = _run(geo3k, [*argv, "--overwrite", "--instruction", "see <image>"], capsys)
    assert rc == 2 and "--instruction must not contain" in err


def _bad_geo_disk(path) -> str:
    good = _image(28, 28, 10)
    rows = [
        ([good], "<image>Good one.", "1"),  # 0
        ([good], "   ", "2"),  # 1 empty problem
        ([good], "<image>No answer.", " "),  # 2 empty answer
        ([{"bytes": b"definitely not a png", "path": None}], "<image>Broken image.", "3"),  # 3
        ([good], "<image><image>Two tags, one image.", "4"),  # 4
        ([], "<image>Tag but no image.", "5"),  # 5
        ([good, _image(28, 28, 11)], "Two images, no tag.", "6"),  # 6 repaired: tags prepended
        ([good, good], "<image>One tag, two images.", "7"),  # 7
    ]
    DatasetDict({"train": Dataset.from_dict(_geo_dict(rows), features=GEO_FEATURES)}).save_to_disk(str(path))
    return str(path)


def test_geo3k_bad_rows_fail_with_row_ids_and_write_nothing(tmp_path, capsys):
    src = _bad_geo_disk(tmp_path / "bad")
    out = tmp_path / "out"
    rc, stdout, err = _run(geo3k, ["--from-disk", src, "--output-dir", str(out)], capsys)
    assert rc == 1
    assert not out.exists(), "a failed run must not leave output behind"
    assert "no local data for split(s) validation, test" in err
    assert "[train] row 1 (geo3k/train/1): empty problem" in err
    assert "[train] row 2 (geo3k/train/2): empty answer" in err
    assert re.search(r"\[train\] row 3 \(geo3k/train/3\): image 0 unreadable: UnidentifiedImageError", err)
    assert "[train] row 4 (geo3k/train/4): 2 <image> tag(s) for 1 image(s)" in err
    assert "[train] row 5 (geo3k/train/5): no image" in err
    assert "[train] row 7 (geo3k/train/7): 1 <image> tag(s) for 2 image(s)" in err
    assert "[train] row 6 (geo3k/train/6): prepended 2 <image> tag(s)" in err
    assert "error: 6 bad row(s) ([train] rows 1, 2, 3, 4, 5, 7); nothing was written" in err
    assert "row 0 " not in err
    assert re.search(r"^split\s+read\s+valid\s+bad\s+repaired$", stdout, re.MULTILINE)  # nothing was "written"
    assert _counts(stdout, "train") == (8, 2, 6, 1)
    assert "OpenRLHF flags" not in stdout

    # An existing output folder is left exactly as it was.
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert _run(geo3k, ["--from-disk", src, "--output-dir", str(out)], capsys)[0] == 1
    assert os.listdir(out) == ["keep.txt"]


def test_geo3k_skip_bad_drops_and_reports(tmp_path, capsys):
    src = _bad_geo_disk(tmp_path / "bad")
    out = tmp_path / "out"
    rc, stdout, err = _run(geo3k, ["--from-disk", src, "--output-dir", str(out), "--skip-bad"], capsys)
    assert rc == 0, err
    assert "Geo3K: 6 bad row(s) dropped (--skip-bad)" in err and "[train] row 3 (geo3k/train/3)" in err
    assert _counts(stdout, "train") == (8, 2, 6, 1)
    rows = _read_jsonl(out / "train.jsonl")
    assert [r["id"] for r in rows] == ["geo3k/train/0", "geo3k/train/6"]  # ids keep the source row
    assert rows[1]["prompt"].startswith("<image><image>Two images, no tag. You FIRST")
    assert [os.path.basename(p) for p in rows[1]["images"]] == ["6_0.png", "6_1.png"]
    assert sorted(os.listdir(out / "images" / "train")) == ["0.png", "6_0.png", "6_1.png"]
    np.testing.assert_array_equal(_pixels(rows[1]["images"][1]), _pixels(_image(28, 28, 11)))
    assert "--data.max_images_per_prompt 2" in stdout
    assert re.search(r"^split\s+read\s+written\s+skipped\s+repaired$", stdout, re.MULTILINE)


def test_geo3k_jsonl_and_parquet_inputs(tmp_path, capsys):
    src = tmp_path / "src"
    (src / "imgs").mkdir(parents=True)
    (src / "data").mkdir()
    _image(28, 28, 20).save(src / "imgs" / "a.png")
    _image(56, 28, 21).save(tmp_path / "abs.jpg", quality=95)
    buf = io.BytesIO()
    _image(28, 28, 22).save(buf, format="PNG")
    data_uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    lines = [
        json.dumps({"images": ["imgs/a.png"], "problem": "<image>Relative path.", "answer": "4"}),
        json.dumps({"images": data_uri, "problem": "<image>Data URI, not a list.", "answer": "(C)"}),
        json.dumps({"images": [str(tmp_path / "abs.jpg")], "problem": "<image>Absolute JPEG.", "answer": "5"}),
        json.dumps({"images": ["imgs/missing.png"], "problem": "<image>Missing file.", "answer": "6"}),
        "{not json",
    ]
    (src / "train.jsonl").write_text("\n".join(lines) + "\n")
    test_rows = [([_image(28, 28, 23)], "<image>From parquet.", "7"), ([_image(28, 28, 24)], "<image>Again.", "8")]
    Dataset.from_dict(_geo_dict(test_rows), features=GEO_FEATURES).to_parquet(
        str(src / "data" / "test-00000-of-00001.parquet")
    )

    out = tmp_path / "out"
    rc, stdout, err = _run(geo3k, ["--from-disk", str(src), "--output-dir", str(out)], capsys)
    assert rc == 1
    assert f"[train] row 3 (geo3k/train/3): image 0 unreadable: file not found: {src / 'imgs' / 'missing.png'}" in err
    assert "[train] row 4 (geo3k/train/4): invalid JSON on line 5" in err

    rc, stdout, err = _run(geo3k, ["--from-disk", str(src), "--output-dir", str(out), "--skip-bad"], capsys)
    assert rc == 0, err
    assert _counts(stdout, "train") == (5, 3, 2, 0) and _counts(stdout, "test") == (2, 2, 0, 0)
    train = _read_jsonl(out / "train.jsonl")
    np.testing.assert_array_equal(_pixels(train[0]["images"][0]), _pixels(_image(28, 28, 20)))
    np.testing.assert_array_equal(_pixels(train[1]["images"][0]), _pixels(_image(28, 28, 22)))
    np.testing.assert_array_equal(_pixels(train[2]["images"][0]), _pixels(str(tmp_path / "abs.jpg")))
    assert train[1]["answer_type"] == "choice" and train[0]["source"] == str(src / "train.jsonl")
    test = _read_jsonl(out / "test.jsonl")
    assert [r["label"] for r in test] == ["7", "8"]
    np.testing.assert_array_equal(_pixels(test[1]["images"][0]), _pixels(_image(28, 28, 24)))

    # The same files bound to splits one by one.
    rc, stdout, err = _run(
        geo3k,
        [
            "--from-disk",
            f"validation={src / 'data' / 'test-00000-of-00001.parquet'}",
            "--splits",
            "validation",
            "--output-dir",
            str(tmp_path / "out2"),
        ],
        capsys,
    )
    assert rc == 0, err
    assert [r["label"] for r in _read_jsonl(tmp_path / "out2" / "validation.jsonl")] == ["7", "8"]


def test_from_disk_single_dataset_and_usage_errors(tmp_path, capsys):
    single = tmp_path / "single"
    Dataset.from_dict(_geo_dict(GEO_SPLITS["validation"]), features=GEO_FEATURES).save_to_disk(str(single))
    out = tmp_path / "out"
    rc, _, err = _run(geo3k, ["--from-disk", str(single), "--output-dir", str(out)], capsys)
    assert rc == 2 and f"bind it to a split with --from-disk SPLIT={single}" in err
    rc, stdout, err = _run(geo3k, ["--from-disk", f"test={single}", "--output-dir", str(out)], capsys)
    assert rc == 0, err
    assert sorted(os.listdir(out)) == ["images", "test.jsonl"]
    # Only a test split: the printed flags never make it the training data.
    assert "--data.prompt_dataset /" not in stdout and f"--eval.dataset {out.resolve() / 'test.jsonl'}" in stdout
    assert "# no training split was converted (only test)" in stdout
    # Existing output needs --overwrite.
    rc, _, err = _run(geo3k, ["--from-disk", f"test={single}", "--output-dir", str(out)], capsys)
    assert rc == 2 and "pass --overwrite" in err
    # An explicitly requested split that the input lacks.
    rc, _, err = _run(
        geo3k, ["--from-disk", f"test={single}", "--splits", "train,test", "--output-dir", str(out)], capsys
    )
    assert rc == 2 and "no data for split(s) train" in err
    rc, _, err = _run(geo3k, ["--from-disk", str(tmp_path / "nope"), "--output-dir", str(out)], capsys)
    assert rc == 2 and "no such file or folder" in err
    (tmp_path / "empty").mkdir()
    rc, _, err = _run(geo3k, ["--from-disk", str(tmp_path / "empty"), "--output-dir", str(out)], capsys)
    assert rc == 2 and "not a save_to_disk folder" in err


def test_overwrite_replaces_stale_images_and_output_is_deterministic(geo_disk, tmp_path, capsys):
    out = tmp_path / "out"

    def snapshot():
        return {
            os.path.relpath(os.path.join(d, f), out): Path(d, f).read_bytes()
            for d, _, files in os.walk(out)
            for f in files
        }

    assert _run(geo3k, ["--from-disk", geo_disk, "--output-dir", str(out)], capsys)[0] == 0
    first = snapshot()
    assert _run(geo3k, ["--from-disk", geo_disk, "--output-dir", str(out), "--overwrite"], capsys)[0] == 0
    assert snapshot() == first  # byte-identical jsonl and PNGs
    assert len([k for k in first if k.endswith(".png")]) == 6

    rc, stdout, _ = _run(
        geo3k, ["--from-disk", geo_disk, "--output-dir", str(out), "--overwrite", "--max-rows", "1"], capsys
    )
    assert rc == 0 and _counts(stdout, "train") == (1, 1, 0, 0)
    assert os.listdir(out / "images" / "train") == ["0.png"]  # the old 1.png and 2.png are gone
    assert not [f for f in os.listdir(out) if f.startswith(".staging")]

    # Embedded images: no paths in the output, so two folders get identical bytes.
    for name in ("e1", "e2"):
        rc, _, err = _run(
            geo3k, ["--from-disk", geo_disk, "--output-dir", str(tmp_path / name), "--embed-images"], capsys
        )
        assert rc == 0, err
    for split in GEO_SPLITS:
        assert (tmp_path / "e1" / f"{split}.jsonl").read_bytes() == (tmp_path / "e2" / f"{split}.jsonl").read_bytes()
    assert sorted(os.listdir(tmp_path / "e1")) == ["test.jsonl", "train.jsonl", "validation.jsonl"]
    row = _read_jsonl(tmp_path / "e1" / "train.jsonl")[0]
    prefix = "data:image/png;base64,"
    assert row["images"][0].startswith(prefix)
    png = base64.b64decode(row["images"][0][len(prefix) :])
    np.testing.assert_array_equal(_pixels(png), _pixels(GEO_SPLITS["train"][0][0][0]))


# ---------------------------------------------------------------------------------------------
# GSM8K


@pytest.mark.parametrize(
    "solution, expected",
    [
        ("She has 3 + 4 = <<3+4=7>>7 apples.\n#### 7", "7"),
        ("Total 1,234 + 1 = 1,235\n#### 1,235", "1235"),
        ("#### 1,000,000", "1000000"),
        ("a #### 3 then\n####  -12 ", "-12"),  # the last #### counts
        ("#### 2.5", "2.5"),
        ("#### $18", "18"),
    ],
)
def test_gsm8k_final_answer(solution, expected):
    assert gsm8k.final_answer(solution) == expected


@pytest.mark.parametrize("solution", ["no marker 5", "#### five", "#### 3/4", "####"])
def test_gsm8k_final_answer_rejects(solution):
    with pytest.raises(gsm8k.AnswerError):
        gsm8k.final_answer(solution)


def test_gsm8k_rows_and_bad_rows(tmp_path, capsys):
    train = {
        "question": ["How many apples?", "What is 1000 + 234?", "Broken?", "Empty?", ""],
        "answer": ["3 + 4 = 7\n#### 7", "1000 + 234 = 1,234\n#### 1,234", "It is five.", "", "#### 1"],
    }
    test = {"question": ["How much is <image> worth?", "Last one?"], "answer": ["#### 2", "#### 9"]}
    src = tmp_path / "gsm8k"
    DatasetDict({"train": Dataset.from_dict(train), "test": Dataset.from_dict(test)}).save_to_disk(str(src))
    out = tmp_path / "out"
    rc, stdout, err = _run(gsm8k, ["--from-disk", str(src), "--output-dir", str(out)], capsys)
    assert rc == 1 and not out.exists()
    assert "[train] row 2 (gsm8k/train/2): no '####' final answer" in err
    assert "[train] row 3 (gsm8k/train/3): empty answer" in err
    assert "[train] row 4 (gsm8k/train/4): empty problem" in err
    assert "[test] row 0 (gsm8k/test/0): text contains '<image>'" in err

    rc, stdout, err = _run(gsm8k, ["--from-disk", str(src), "--output-dir", str(out), "--skip-bad"], capsys)
    assert rc == 0, err
    assert _counts(stdout, "train") == (5, 2, 3, 0) and _counts(stdout, "test") == (2, 1, 1, 0)
    rows = _read_jsonl(out / "train.jsonl")
    assert [list(r) for r in rows] == [[k for k in ROW_KEYS if k != "images"]] * 2
    assert [r["label"] for r in rows] == ["7", "1234"]
    assert rows[1]["prompt"] == "What is 1000 + 234? " + DEFAULT_INSTRUCTION
    assert {r["answer_type"] for r in rows} == {"number"} and rows[0]["datasource"] == "gsm8k"
    assert "--data.input_key prompt --data.label_key label --data.apply_chat_template" in stdout
    assert "image_key" not in stdout and "max_images" not in stdout
    assert os.listdir(out) == sorted(os.listdir(out)) and "images" not in os.listdir(out)


# ---------------------------------------------------------------------------------------------
# MATH


@pytest.mark.parametrize(
    "solution, expected",
    [
        ("So $x = \\boxed{5}$.", "5"),
        ("$\\boxed{\\frac{1}{\\sqrt{2}}}$", "\\frac{1}{\\sqrt{2}}"),
        ("First \\boxed{1}, finally \\boxed{2}.", "2"),
        ("The set is $\\boxed{\\{1, 2\\}}$.", "\\{1, 2\\}"),
        ("$\\boxed{\\left\\{ x \\mid x>0 \\right.}$", "\\left\\{ x \\mid x>0 \\right."),  # escaped brace not counted
        ("\\boxed{\\text{(A)}\\ \\left(\\frac{a}{b}\\right)}", "\\text{(A)}\\ \\left(\\frac{a}{b}\\right)"),
        ("Answer: \\fbox{3}", "3"),
        ("so $\\boxed 7$.", "7"),
        ("\\boxed{ 2^{10} }", "2^{10}"),
        ("no box here", None),
        ("\\boxed{\\frac{1}{2}", None),
    ],
)
def test_math_last_boxed(solution, expected):
    assert math_prep.last_boxed(solution) == expected


def test_math_train_and_math500(tmp_path, capsys):
    train = Dataset.from_dict(
        {
            "problem": ["What is $1/2$?", "Name the set.", "Compute $2^{10}$.", "Unboxed.", "Unclosed."],
            "solution": [
                "It is $\\boxed{\\frac{1}{2}}$.",
                "$\\boxed{\\{a, b\\}}$",
                "Then $\\boxed{1024}$.",
                "The answer is 3.",
                "$\\boxed{\\frac{1}{2}$",
            ],
            "level": ["Level 2", "Level 5", "Level ?", "Level 1", "Level 1"],
            "type": ["Algebra", "Counting & Probability", "Algebra", "Algebra", "Algebra"],
        }
    )
    train.save_to_disk(str(tmp_path / "math_train"))  # a single Dataset: bound to train below
    math500 = [
        {
            "problem": "Find $x$.",
            "solution": "... $\\boxed{3}$",
            "answer": "3",
            "subject": "Algebra",
            "level": 1,
            "unique_id": "test/algebra/1.json",
        },
        {
            "problem": "Who?",
            "solution": "\\boxed{\\text{Evelyn}}",
            "answer": "\\text{Evelyn}",
            "subject": "Prealgebra",
            "level": 2,
            "unique_id": "test/prealgebra/2.json",
        },
    ]
    (tmp_path / "math500.jsonl").write_text("".join(json.dumps(r) + "\n" for r in math500))
    out = tmp_path / "out"
    argv = [
        "--from-disk",
        f"train={tmp_path / 'math_train'}",
        "--from-disk",
        f"test={tmp_path / 'math500.jsonl'}",
        "--output-dir",
        str(out),
    ]
    rc, stdout, err = _run(math_prep, argv, capsys)
    assert rc == 1
    assert "[train] row 3 (math/train/3): no \\boxed{} answer in the solution" in err
    assert "[train] row 4 (math/train/4): the last \\boxed in the solution is not closed" in err

    rc, stdout, err = _run(math_prep, [*argv, "--skip-bad"], capsys)
    assert rc == 0, err
    rows = _read_jsonl(out / "train.jsonl")
    assert [r["label"] for r in rows] == ["\\frac{1}{2}", "\\{a, b\\}", "1024"]
    assert [r["level"] for r in rows] == [2, 5, None]
    assert [r["subject"] for r in rows] == ["Algebra", "Counting & Probability", "Algebra"]
    assert [r["answer_type"] for r in rows] == ["expression", "expression", "number"]
    assert list(rows[0]) == [k for k in ROW_KEYS if k != "images"] + ["level", "subject"]
    test = _read_jsonl(out / "test.jsonl")
    assert [r["label"] for r in test] == ["3", "\\text{Evelyn}"]
    assert test[1]["unique_id"] == "test/prealgebra/2.json" and test[1]["level"] == 2
    assert test[0]["prompt"] == "Find $x$. " + DEFAULT_INSTRUCTION and test[0]["id"] == "math/test/0"
    assert f"--eval.dataset {out.resolve() / 'test.jsonl'}" in stdout


def test_long_base64_looking_output_dir_is_refused(tmp_path, capsys):
    # OpenRLHF's load_images would decode such a path as base64 and drop the image (with a warning).
    assert common.upstream_reads_as_base64("/" + "a" * 600 + "/images/train/0.png")
    assert not common.upstream_reads_as_base64("/" + "a" * 300 + "/images/train/0.png")  # '.png' in the first 512
    assert not common.upstream_reads_as_base64("/" + "a" * 300 + "/my_data/" + "b" * 300 + "/images/train/0.png")
    assert not common.upstream_reads_as_base64("/data/geo3k/images/train/0.png")
    from openrlhf.utils.vlm_utils import _is_base64_image  # the rule being mirrored

    for ref in ("/" + "a" * 600 + "/images/train/0.png", "/" + "a" * 300 + "/images/train/0.png", "/d/images/0.png"):
        assert common.upstream_reads_as_base64(ref) == _is_base64_image(ref)
    out = "/" + "/".join(["abcdefghij" * 10] * 6)
    rc, _, err = _run(geo3k, ["--from-disk", "unused", "--output-dir", out], capsys)
    assert rc == 2 and "would be read as base64 by OpenRLHF" in err and not os.path.exists("/abcdefghij")


def test_guess_answer_type():
    cases = {
        "3": "number",
        "-2.5": "number",
        "1,024": "number",
        "3/4": "number",
        "50\\%": "number",
        "$12": "number",
        "A": "choice",
        "(D)": "choice",
        "Evelyn": "text",
        "x+1": "expression",
        "\\frac{1}{2}": "expression",
        "2\\sqrt{3}": "expression",
        "(1, 2)": "expression",
        "x": "expression",
    }
    assert {k: common.guess_answer_type(k) for k in cases} == cases


# ---------------------------------------------------------------------------------------------
# Hub path (no network: `datasets.load_dataset` is replaced) and the real `python -m` entry point


def test_hub_sources_call_load_dataset(monkeypatch, tmp_path, capsys):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, revision=None, cache_dir=None):
        calls.append((path, name, split))
        if path == geo3k.DEFAULT_HUB_ID:
            return Dataset.from_dict(_geo_dict(GEO_SPLITS[split]), features=GEO_FEATURES)
        if path == math_prep.DEFAULT_TRAIN_HUB_ID:
            return Dataset.from_dict(
                {"problem": [f"{name}?"], "solution": ["\\boxed{1}"], "level": ["Level 1"], "type": ["T"]}
            )
        if path == math_prep.DEFAULT_TEST_HUB_ID:
            return Dataset.from_dict(
                {
                    "problem": ["p"],
                    "answer": ["2"],
                    "solution": ["s"],
                    "subject": ["S"],
                    "level": [3],
                    "unique_id": ["u"],
                }
            )
        raise ConnectionError("no network in tests")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rc, stdout, err = _run(geo3k, ["--output-dir", str(tmp_path / "geo")], capsys)
    assert rc == 0, err
    assert calls == [(geo3k.DEFAULT_HUB_ID, None, s) for s in ("train", "validation", "test")]
    assert _counts(stdout, "train") == (3, 3, 0, 0) and _counts(stdout, "test") == (2, 2, 0, 0)
    assert _read_jsonl(tmp_path / "geo" / "train.jsonl")[0]["source"] == "hiyouga/geometry3k"

    calls.clear()
    rc, _, err = _run(math_prep, ["--output-dir", str(tmp_path / "math")], capsys)
    assert rc == 0, err
    assert calls == [(math_prep.DEFAULT_TRAIN_HUB_ID, c, "train") for c in math_prep.DEFAULT_TRAIN_CONFIGS] + [
        (math_prep.DEFAULT_TEST_HUB_ID, None, "test")
    ]
    train = _read_jsonl(tmp_path / "math" / "train.jsonl")
    assert [r["source"] for r in train] == [f"EleutherAI/hendrycks_math:{c}" for c in math_prep.DEFAULT_TRAIN_CONFIGS]
    assert [r["id"] for r in train] == [f"math/train/{i}" for i in range(7)]

    rc, _, err = _run(gsm8k, ["--output-dir", str(tmp_path / "gsm")], capsys)
    assert rc == 2
    assert "could not load openai/gsm8k (config 'main'), split 'train'" in err and "--from-disk" in err
    assert not (tmp_path / "gsm").exists()


def test_python_dash_m_subprocess(tmp_path):
    src = tmp_path / "math500.jsonl"
    src.write_text(json.dumps({"problem": "1+1?", "answer": "2", "solution": "\\boxed{2}"}) + "\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "openrlhf_sapo.data.math", "--from-disk", f"test={src}", "--output-dir", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "no local data for split(s) train" in proc.stderr  # default splits: the missing one is reported
    assert _counts(proc.stdout, "test") == (1, 1, 0, 0)
    assert "--data.apply_chat_template" in proc.stdout
    assert _read_jsonl(out / "test.jsonl")[0]["label"] == "2"
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert again.returncode == 2 and "--overwrite" in again.stderr


# ---------------------------------------------------------------------------------------------
# OpenRLHF's own loader on the produced files


def _tiny_qwen2vl_processor():
    """A Qwen2-VL processor built offline: character-level tokenizer + PIL image processor.

    transformers 5.15's Qwen2VLProcessor insists on a video processor (which needs torchvision, not
    installable here), so a subclass passes None for it.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

    specials = [
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
        "<|endoftext|>",
    ]
    vocab = {t: i for i, t in enumerate(specials + [chr(c) for c in range(32, 127)] + ["\n", "[UNK]"])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tok.add_special_tokens({"additional_special_tokens": specials})
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
        "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )

    class NoVideoQwen2VLProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, video_processor=None, chat_template=chat_template, **kwargs)

    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=28 * 28 * 64)
    return NoVideoQwen2VLProcessor(image_processor=image_processor, tokenizer=tok, chat_template=template)


def _printed_openrlhf_args(stdout: str) -> SimpleNamespace:
    """The `--data.*` / `--eval.*` flags the CLI printed, as OpenRLHF's nested args."""
    block = stdout[stdout.index("OpenRLHF flags:") :]
    data = SimpleNamespace(apply_chat_template="--data.apply_chat_template" in block)
    ev = SimpleNamespace(dataset=None)
    for section, key, value in re.findall(r"--(data|eval)\.(\w+) (?!--)(\S+)", block):
        setattr(data if section == "data" else ev, key, int(value) if value.isdigit() else value)
    return SimpleNamespace(data=data, eval=ev, use_ms=False)


@pytest.fixture
def openrlhf_env(monkeypatch, tmp_path):
    import datasets

    # OpenRLHF loads .jsonl with datasets.load_dataset("json", ...): keep its cache here, never go online.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    from openrlhf.datasets import PromptDataset
    from openrlhf.datasets.utils import blending_datasets
    from openrlhf.utils.vlm_utils import load_images, process_prompt_with_images

    return SimpleNamespace(
        PromptDataset=PromptDataset,
        blending_datasets=blending_datasets,
        load_images=load_images,
        process_prompt_with_images=process_prompt_with_images,
    )


def _strategy(args):
    return SimpleNamespace(args=args, print=lambda *a, **k: None, is_rank_0=lambda: True)


@pytest.mark.parametrize("image_mode", ["absolute", "embed"])
def test_openrlhf_reads_geo3k_output(geo_disk, tmp_path, capsys, openrlhf_env, image_mode):
    out = tmp_path / "out"
    extra = ["--embed-images"] if image_mode == "embed" else []
    rc, stdout, err = _run(geo3k, ["--from-disk", geo_disk, "--output-dir", str(out), *extra], capsys)
    assert rc == 0, err
    args = _printed_openrlhf_args(stdout)
    assert (args.data.input_key, args.data.label_key, args.data.image_key) == ("prompt", "label", "images")
    assert args.data.apply_chat_template and args.data.max_images_per_prompt == 1
    strategy = _strategy(args)
    processor = _tiny_qwen2vl_processor()
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")

    # As trainer/ppo_trainer.py prepare_datasets does, with the default split names ("train").
    for path, split in ((args.data.prompt_dataset, "train"), (args.eval.dataset, "test")):
        data = openrlhf_env.blending_datasets(path, None, strategy, dataset_split="train")
        assert len(data) == len(GEO_SPLITS[split])
        dataset = openrlhf_env.PromptDataset(data, processor, strategy)
        for i, (images, problem, answer) in enumerate(GEO_SPLITS[split]):
            datasource, prompt, label, refs = dataset[i]
            assert (datasource, label) == ("geo3k", answer)
            assert prompt.count("<|vision_start|><|image_pad|><|vision_end|>") == 1
            assert prompt.endswith(DEFAULT_INSTRUCTION + "<|im_end|>\n<|im_start|>assistant\n")
            assert "<image>" not in prompt
            loaded = openrlhf_env.load_images(refs)
            assert len(loaded) == len(images) <= args.data.max_images_per_prompt
            np.testing.assert_array_equal(_pixels(loaded[0]), _pixels(images[0]))
            token_ids, mm, _ = openrlhf_env.process_prompt_with_images(processor, prompt, refs)
            w, h = images[0].size
            assert token_ids.count(image_pad) == (w // 28) * (h // 28)  # one token per 28x28 after the 2x2 merge
            assert mm["pixel_values"].shape[0] == (w // 14) * (h // 14)
            assert mm["image_grid_thw"].tolist() == [[1, h // 14, w // 14]]

    # The tag in the middle of a problem becomes an image item in the middle of the user turn.
    data = openrlhf_env.blending_datasets(args.data.prompt_dataset, None, strategy, dataset_split="train")
    prompt = openrlhf_env.PromptDataset(data, processor, strategy)[1][1]
    assert prompt == (
        "<|im_start|>user\nIn the figure,<|vision_start|><|image_pad|><|vision_end|>find the area. "
        + DEFAULT_INSTRUCTION
        + "<|im_end|>\n<|im_start|>assistant\n"
    )


def test_openrlhf_image_paths_absolute_vs_relative(geo_disk, tmp_path, capsys, openrlhf_env, monkeypatch):
    """OpenRLHF opens a path string relative to the process's cwd and only warns on failure."""
    for name, extra in (("abs", []), ("rel", ["--relative-image-paths"])):
        rc, _, err = _run(
            geo3k, ["--from-disk", geo_disk, "--output-dir", str(tmp_path / name), "--splits", "train", *extra], capsys
        )
        assert rc == 0, err
    abs_refs = _read_jsonl(tmp_path / "abs" / "train.jsonl")[0]["images"]
    rel_refs = _read_jsonl(tmp_path / "rel" / "train.jsonl")[0]["images"]
    assert rel_refs == ["images/train/0.png"] and os.path.isabs(abs_refs[0])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert len(openrlhf_env.load_images(abs_refs)) == 1
    assert openrlhf_env.load_images(rel_refs) == []  # silently lost: why absolute paths are the default
    monkeypatch.chdir(tmp_path / "rel")
    np.testing.assert_array_equal(_pixels(openrlhf_env.load_images(rel_refs)[0]), _pixels(GEO_SPLITS["train"][0][0][0]))


def test_openrlhf_reads_text_output_and_mixes_with_geo3k(geo_out, tmp_path, capsys, openrlhf_env):
    src = tmp_path / "gsm8k"
    DatasetDict(
        {
            "train": Dataset.from_dict({"question": ["Q1?", "Q2?"], "answer": ["#### 1", "#### 2,000"]}),
            "test": Dataset.from_dict({"question": ["Q3?"], "answer": ["#### 3"]}),
        }
    ).save_to_disk(str(src))
    rc, stdout, err = _run(gsm8k, ["--from-disk", str(src), "--output-dir", str(tmp_path / "out")], capsys)
    assert rc == 0, err
    args = _printed_openrlhf_args(stdout)
    assert getattr(args.data, "image_key", None) is None
    args.data.image_key = "images"  # OpenRLHF's default
    strategy = _strategy(args)
    processor = _tiny_qwen2vl_processor()
    data = openrlhf_env.blending_datasets(args.data.prompt_dataset, None, strategy, dataset_split="train")
    dataset = openrlhf_env.PromptDataset(data, processor, strategy)
    assert dataset[1] == (
        "gsm8k",
        f"<|im_start|>user\nQ2? {DEFAULT_INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n",
        "2000",
        None,
    )
    token_ids, mm, pil = openrlhf_env.process_prompt_with_images(processor, dataset[1][1], dataset[1][3])
    assert mm is None and pil == [] and len(token_ids) > 0

    # Text and image rows in one run: --data.prompt_dataset a.jsonl,b.jsonl (concatenated upstream).
    mixed = openrlhf_env.blending_datasets(f"{args.data.prompt_dataset},{geo_out / 'train.jsonl'}", None, strategy)
    dataset = openrlhf_env.PromptDataset(mixed, processor, strategy)
    assert [dataset[i][0] for i in range(len(dataset))] == ["gsm8k"] * 2 + ["geo3k"] * 3
    assert dataset[0][3] is None and len(openrlhf_env.load_images(dataset[2][3])) == 1
