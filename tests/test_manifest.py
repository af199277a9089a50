from collections import Counter

import pytest

from tmad_ray.data.manifest import ManifestError, load_manifest, map_label, parse_split_file


def write(root, name, text):
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(text)


def touch_videos(root, *names):
    (root / "videos").mkdir(parents=True, exist_ok=True)
    for n in names:
        (root / "videos" / n).write_bytes(b"x")


@pytest.mark.parametrize("raw, as_is, first, binary", [
    ("A", "A", "A", "normal"),
    ("B1", "B1", "B1", "violent"),
    ("B-1", "B-1", "B", "violent"),
    ("B2-G-0", "B2-G-0", "B2", "violent"),
    ("G", "G", "G", "violent"),
    ("A-0-0", "A-0-0", "A", "normal"),
])
def test_label_modes(raw, as_is, first, binary):
    assert (map_label(raw, "as_is"), map_label(raw, "first"), map_label(raw, "binary")) == (as_is, first, binary)


def test_both_line_formats_comments_and_header(tmp_path):
    write(tmp_path, "a.csv", "# comment\nvideos/1.mp4 A\n\nvideos/2.mp4\tB1\n")
    write(tmp_path, "b.csv", "path,label\nvideos/1.mp4,A\nvideos/2.mp4, B2-G-0\n")
    a, pa = parse_split_file(tmp_path / "a.csv")
    b, pb = parse_split_file(tmp_path / "b.csv")
    assert a == [(2, "videos/1.mp4", "A"), (4, "videos/2.mp4", "B1")] and not pa
    assert b == [(2, "videos/1.mp4", "A"), (3, "videos/2.mp4", "B2-G-0")] and not pb


def test_malformed_lines_are_reported_with_their_line(tmp_path):
    write(tmp_path, "train.csv", "videos/1.mp4 A\nvideos/2.mp4\nvideos/3.mp4 A extra\n")
    _, problems = parse_split_file(tmp_path / "train.csv")
    assert [(p.split_file, p.line) for p in problems] == [("train.csv", 2), ("train.csv", 3)]
    assert all("malformed" in p.reason for p in problems)


def test_labels_from_train_and_unknown_val_label_is_a_problem(tmp_path):
    touch_videos(tmp_path, "1.mp4", "2.mp4", "3.mp4", "4.mp4")
    write(tmp_path, "train.csv", "videos/1.mp4 B1\nvideos/2.mp4 A\n")
    write(tmp_path, "val.csv", "videos/3.mp4 A\nvideos/4.mp4 G\n")
    m = load_manifest(tmp_path)
    assert m.labels == ["A", "B1"] and m.label2id == {"A": 0, "B1": 1}
    assert [r.path for r in m.rows["val"]] == ["videos/3.mp4"]
    (p,) = m.problems
    assert (p.path, p.split_file, p.line) == ("videos/4.mp4", "val.csv", 2) and "'G'" in p.reason
    with pytest.raises(ManifestError, match="val.csv:2"):
        m.raise_for_problems()


def test_missing_videos_are_problems(tmp_path):
    touch_videos(tmp_path, "1.mp4")
    write(tmp_path, "train.csv", "videos/1.mp4 A\nvideos/gone.mp4 A\n")
    write(tmp_path, "val.csv", "videos/1.mp4 A\n")
    m = load_manifest(tmp_path)
    assert [(p.path, p.reason, p.line) for p in m.problems] == [("videos/gone.mp4", "missing video", 2)]


def test_missing_root_or_train_split_is_an_error(tmp_path):
    with pytest.raises(ManifestError, match="root not found"):
        load_manifest(tmp_path / "nope")
    tmp_path.mkdir(exist_ok=True)
    with pytest.raises(ManifestError, match="train.csv"):
        load_manifest(tmp_path)


def test_val_split_is_stratified_seeded_and_disjoint(tmp_path):
    names = [f"{c}{i}.mp4" for c in "AB" for i in range(10)]
    touch_videos(tmp_path, *names)
    write(tmp_path, "train.csv", "".join(f"videos/{n} {n[0]}\n" for n in names))
    m1 = load_manifest(tmp_path, val_fraction=0.2, split_seed=1)
    m2 = load_manifest(tmp_path, val_fraction=0.2, split_seed=1)
    m3 = load_manifest(tmp_path, val_fraction=0.2, split_seed=2)
    assert m1.val_from_train
    assert Counter(r.label for r in m1.rows["val"]) == {"A": 2, "B": 2}
    train, val = {r.path for r in m1.rows["train"]}, {r.path for r in m1.rows["val"]}
    assert not train & val and len(train | val) == 20
    assert [r.path for r in m1.rows["val"]] == [r.path for r in m2.rows["val"]]
    assert [r.path for r in m1.rows["val"]] != [r.path for r in m3.rows["val"]]
    # Rows keep where they came from, for reports.
    assert all(r.file == "train.csv" and r.line > 0 for r in m1.rows["val"])


@pytest.mark.parametrize("bad", ["../../outside.mp4", "/etc/hostname", "../../../../etc/passwd", "videos/link.mp4"])
def test_paths_outside_the_data_root_are_problems_and_never_opened(tmp_path, bad):
    root = tmp_path / "deep" / "er" / "ds"
    touch_videos(root, "ok.mp4")
    (tmp_path / "deep" / "outside.mp4").write_bytes(b"x")  # ../../outside.mp4 from ROOT exists
    (root / "videos" / "link.mp4").symlink_to(tmp_path / "deep" / "outside.mp4")  # inside by name, outside in fact
    write(root, "train.csv", f"videos/ok.mp4 A\n{bad} B\n")
    m = load_manifest(root)
    assert [r.path for r in m.rows["train"]] == ["videos/ok.mp4"] and m.labels == ["A"]
    [p] = m.problems
    assert p.path == bad and p.line == 2 and "outside the data root" in p.reason


def test_a_byte_order_mark_is_not_part_of_the_first_path_or_a_header(tmp_path):
    touch_videos(tmp_path, "1.mp4", "2.mp4")
    (tmp_path / "train.csv").write_bytes("\ufeffvideos/1.mp4 A\nvideos/2.mp4 B\n".encode("utf-8"))
    m = load_manifest(tmp_path)
    assert [r.path for r in m.rows["train"]] == ["videos/1.mp4", "videos/2.mp4"] and not m.problems
    (tmp_path / "train.csv").write_bytes("\ufeffpath,label\nvideos/1.mp4,A\nvideos/2.mp4,B\n".encode("utf-8"))
    m = load_manifest(tmp_path)
    assert m.labels == ["A", "B"] and not m.problems  # the header is a header, not a class 'label'


def test_a_split_file_that_is_not_utf8_is_a_clear_error(tmp_path):
    touch_videos(tmp_path, "1.mp4")
    (tmp_path / "train.csv").write_bytes(b"videos/1.mp4 caf\xe9\n")
    with pytest.raises(ManifestError, match="train.csv is not UTF-8 text"):
        load_manifest(tmp_path)


def test_labels_come_from_the_rows_that_survive(tmp_path):
    touch_videos(tmp_path, "1.mp4", "2.mp4")
    write(tmp_path, "train.csv", "videos/1.mp4 A\nvideos/2.mp4 B\nvideos/missing.mp4 Q\n")
    write(tmp_path, "val.csv", "videos/1.mp4 Q\n")
    m = load_manifest(tmp_path)
    assert m.labels == ["A", "B"] and m.empty_classes == ["Q"]  # no empty class Q in the classifier
    assert {(p.split_file, p.reason.split(" ")[0]) for p in m.problems} == {("train.csv", "missing"),
                                                                           ("val.csv", "label")}
