"""benchmark.py runs end to end and writes every figure it prints (speed itself is not tested)."""

import json

from conftest import ROOT, load_script, run_in_process


def test_benchmark_writes_its_figures(tmp_path):
    bench = load_script("benchmark")
    out = tmp_path / "bench.json"
    args = ["--runs", "1", "--batch-size", "8", "--csv-rows", "50", "--photos", "3", "--json", str(out)]
    results = bench.main(bench.parse_args(args))
    saved = json.loads(out.read_text())
    for key in (
        "train_img_s_fp32",
        "train_img_s_bf16",
        "infer_one_face_s",
        "infer_one_face_int8_1_thread_s",
        "infer_one_face_pytorch_s",
        "infer_one_face_pytorch_all_cores_s",
        "busy_one_face_s",
        "busy_one_face_int8_1_thread_s",
        "busy_one_face_pytorch_s",
        "busy_one_face_pytorch_all_cores_s",
        "busy_video_640x480_fps",
        "csv_rows_s",
        "infer_batched_faces_s",
        "infer_batched_no_tta_faces_s",
        "infer_batched_int8_faces_s",
        "photo_detect_ms",
        "photo_classify_ms",
        "video_640x480_fps",
        "train_flops_per_image",
        "matmul_flops_bf16",
        "utilisation",
        "photos_s_one",
        "photos_s_pool",
    ):
        assert saved[key] == results[key] and saved[key] > 0, key
    assert saved["photo_faces"] >= 1  # the sample photo has a face
    assert saved["photos"] == 3 and saved["photo_workers"] == min(3, load_script("test").PHOTO_WORKERS)
    assert saved["engine"] == "int8"  # the shipped model's copy is what test.py runs
    assert saved["cpu"] and f"| machine | {saved['cpu']}" in bench.markdown_table(saved)  # figures name their machine


def test_results_speed_table_is_the_saved_benchmark():
    bench = load_script("benchmark")
    table = bench.markdown_table(json.loads((ROOT / "models" / "benchmark.json").read_text()))
    assert table in (ROOT / "RESULTS.md").read_text(), (
        "RESULTS.md's speed table is not models/benchmark.json's: "
        "paste `python benchmark.py --markdown models/benchmark.json`"
    )


def test_markdown_of_a_bad_file_is_a_clear_error(tmp_path):
    bench = load_script("benchmark")
    cases = {"missing.json": None, "damaged.json": "{not json", "list.json": "[1]", "partial.json": '{"cpu": "x"}'}
    for name, text in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        r = run_in_process(bench, "--markdown", tmp_path / name)
        assert r.returncode == 1 and f"--markdown {tmp_path / name}" in r.stderr and "Traceback" not in r.stderr, name
    assert "lacks 'train_img_s_bf16'" in r.stderr  # the last case names what is missing
