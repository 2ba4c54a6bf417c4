import json
import os
import signal
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from jaxground.data.batch import Batch
from jaxground.data.conversation import IGNORE, BadSample
from jaxground.data.mixture import ListSource, Mixture, MixtureSampler, build_source
from jaxground.data.pipeline import make_pipeline, pipeline_config
from jaxground.data.records import Example, png_bytes, write_records


def _cfg(shapes_dir, **kw):
    cfg = pipeline_config(num_image_tokens=4, image_size=16, max_len=80, batch_size=4, **kw)
    cfg.datasets.shapes.path = str(shapes_dir)
    return cfg


def _pipe(cfg, training=True, **kw):
    return make_pipeline(cfg, training=training, process_index=kw.pop("index", 0),
                         process_count=kw.pop("count", 1), **kw)


def test_batches_fill_batch_exactly(shapes_dir, encoder):
    b = next(_pipe(_cfg(shapes_dir, with_masks=True, mask_size=32, with_sam=True, sam_size=48)))
    Batch(**b)
    assert b["sam_images"].shape == (4, 48, 48, 3) and b["sam_images"].dtype == np.float32
    assert b["images"].shape == (4, 16, 16, 3) and b["images"].dtype == np.float32
    assert b["input_ids"].shape == (4, 80) and b["input_ids"].dtype == np.int32
    assert b["labels"].dtype == np.int32 and b["attention_mask"].dtype == bool and b["valid"].all()
    ids = encoder.ids
    for r in range(4):
        x, y, m = b["input_ids"][r], b["labels"][r], b["attention_mask"][r]
        assert (y[~m] == IGNORE).all() and (x[~m] == ids.pad).all() and m[: m.sum()].all()
        assert b["box_mask"][r].sum() == (x == ids.boxes).sum()
        assert b["target_mask"][r].sum() == (y == ids.at).sum()
        assert not (y == ids.boxes).any()
        # Each target mask's bounding box is its target box (the same padded-square geometry).
        for k in np.nonzero(b["mask_valid"][r])[0]:
            ys, xs = np.nonzero(b["masks"][r, k])
            np.testing.assert_allclose(np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) / 32,
                                       b["target_boxes"][r, k], atol=1e-5)
    assert b["mask_valid"].sum() == b["target_mask"].sum()


def test_patch_targets_are_the_first_target_mask_per_patch(shapes_dir):
    cfg = _cfg(shapes_dir, task_weights={"rec": 1.0, "pope": 1.0}, with_masks=True, mask_size=16, patch_targets=8)
    cfg.batch_size = 16
    b = next(_pipe(cfg))
    Batch(**b)
    assert b["patch_target"].shape == (16, 4) and b["patch_target"].dtype == np.float32
    with_target = b["target_mask"][:, 0]
    assert 0 < with_target.sum() < 16  # both kinds of rows: REC (a box) and POPE (none)
    for r in range(16):
        if with_target[r]:
            want = b["masks"][r, 0].reshape(2, 8, 2, 8).mean((1, 3)).reshape(-1)
            np.testing.assert_allclose(b["patch_target"][r], want)
            assert b["patch_target"][r].max() > 0
        else:
            assert (b["patch_target"][r] == -1).all()
    cfg.patch_targets = 5
    with pytest.raises(ValueError, match="patch_targets"):
        next(_pipe(cfg))


def test_patch_attributes_label_each_patch_with_its_object(shapes_dir):
    """The attribute aid's labels, recomputed from the records: a patch takes the (shape, size) class of the
    object covering most of it (at least a quarter), 0 where objects cover under 5%, else -1."""
    from jaxground.data.records import RecordSource
    from jaxground.data.shapes import SHAPES, SIZES, patch_class

    assert patch_class({"shape": SHAPES[0], "size": SIZES[0]}) == 1
    assert patch_class({"shape": SHAPES[-1], "size": SIZES[-1]}) == len(SHAPES) * len(SIZES)
    cfg = _cfg(shapes_dir, patch_attributes=8)
    cfg.batch_size, cfg.image_size, cfg.num_image_tokens = 8, 32, 16
    labels = next(_pipe(cfg, training=False))["patch_attr"]
    assert labels.shape == (8, 16) and labels.dtype == np.int32
    src = RecordSource(sorted(shapes_dir.glob("train*.array_record")))
    for r in range(8):  # evaluation order = record order, one REC item per record here
        ex = src[r]
        assert ex.masks.shape[1:] == (32, 32)  # square images: no padding to account for
        share = ex.masks.reshape(len(ex.masks), 4, 8, 4, 8).mean((2, 4)).reshape(len(ex.masks), 16)
        for p in range(16):
            best = int(share[:, p].argmax())
            want = (patch_class(ex.attrs[best]) if share[best, p] >= 0.25 else 0 if share[:, p].sum() < 0.05
                    else -1)
            assert labels[r, p] == want
    assert (labels > 0).any() and (labels == 0).any()
    cfg.patch_attributes = 3
    with pytest.raises(ValueError, match="patch_attributes"):
        next(_pipe(cfg))


def test_turns_ask_several_distinct_questions_within_max_len(shapes_dir, encoder):
    ids = encoder.ids
    def batch(max_len, turns):
        cfg = _cfg(shapes_dir, task_weights={"rec": 1.0}, turns=turns)
        cfg.max_len = max_len
        return next(_pipe(cfg))

    one, many, short = batch(160, 1), batch(160, 3), batch(48, 3)
    assert (one["target_mask"].sum(1) == 1).all()
    assert many["target_mask"].sum(1).max() == 3 and (many["target_mask"].sum(1) >= 1).all()
    assert short["valid"].all() and short["target_mask"].sum(1).max() < 3  # turns dropped, no sample skipped
    for r in range(4):
        x, y, m = many["input_ids"][r], many["labels"][r], many["attention_mask"][r]
        n = int(many["target_mask"][r].sum())
        assert (x == ids.im_patch).sum() == 4 and (y == ids.at).sum() == n and (x == ids.boxes).sum() == n
        questions = encoder.tok.decode(x[m]).split("USER:")[1:]
        assert len(questions) == n and len(set(questions)) == n  # distinct items of the same image
    with pytest.raises(ValueError, match="turns"):
        batch(160, 0)


def test_rec_answer_restates_the_expression_before_its_box(shapes_dir, encoder):
    cfg = _cfg(shapes_dir, task_weights={"rec": 1.0}, rec_answer="expression")
    b = next(_pipe(cfg))
    for r in range(4):
        x, y, m = b["input_ids"][r], b["labels"][r], b["attention_mask"][r]
        text = encoder.tok.decode(x[m])
        question, answer = text.split("ASSISTANT:")
        expr = answer.split("<at>")[0].strip()
        assert expr[0].isupper() and expr.lower() in question.lower(), text  # the question's expression, restated
        assert (y == encoder.ids.at).sum() == 1 and b["target_mask"][r].sum() == 1
    cfg.rec_answer = "nosuch"
    with pytest.raises(ValueError, match="rec_answer"):
        next(_pipe(cfg))


def test_resume_gives_the_same_next_batches(shapes_dir):
    it = _pipe(_cfg(shapes_dir))
    next(it), next(it)
    state = it.get_state()
    want = [next(it) for _ in range(3)]
    again = _pipe(_cfg(shapes_dir))
    again.set_state(state)
    for w in want:
        got = next(again)
        for k in w:
            np.testing.assert_array_equal(got[k], w[k], err_msg=k)


def test_eval_pads_the_last_batch_and_ends(shapes_dir):
    cfg = _cfg(shapes_dir)
    cfg.datasets.shapes.split = "val"  # 10 records: 4 + 4 + (2 + 2 pad rows)
    batches = list(_pipe(cfg, training=False))
    assert [b["valid"].tolist() for b in batches] == [[True] * 4, [True] * 4, [True, True, False, False]]
    last = batches[-1]
    assert not last["attention_mask"][2:].any() and (last["labels"][2:] == IGNORE).all()
    assert not last["box_mask"][2:].any() and not last["target_mask"][2:].any()


def test_eval_task_makes_every_item_a_sample(shapes_dir, encoder):
    cfg = _cfg(shapes_dir, task="rec")
    cfg.datasets.shapes.split = "val"
    src = build_source(cfg.datasets.shapes)
    n_items = sum(len(src[i].tasks["rec"]) for i in range(len(src)))
    batches = list(_pipe(cfg, training=False))
    assert sum(int(b["valid"].sum()) for b in batches) == n_items
    for b in batches:  # REC as the authors evaluate it: one trigger per sample, teacher-forced answer
        assert (b["target_mask"].sum(1) == b["valid"]).all()


def test_hosts_get_disjoint_shards(shapes_dir):
    cfg = _cfg(shapes_dir)
    cfg.datasets.shapes.split = "val"
    cfg.batch_size = 1
    rows = [[b["images"].tobytes() for b in _pipe(cfg, training=False, index=i, count=2)] for i in range(2)]
    assert len(rows[0]) == len(rows[1]) == 5 and not set(rows[0]) & set(rows[1])


def test_eval_on_more_hosts_than_divide_it_reads_every_record_in_step(shapes_dir):
    cfg = _cfg(shapes_dir)
    cfg.datasets.shapes.split = "val"  # 10 records on 4 hosts: 3 rows each, the last 2 padding
    cfg.batch_size = 2
    hosts = [list(_pipe(cfg, training=False, index=i, count=4)) for i in range(4)]
    assert [len(h) for h in hosts] == [2] * 4  # lockstep: the same number of batches everywhere
    valid = [b["images"][r].tobytes() for h in hosts for b in h for r in np.flatnonzero(b["valid"])]
    assert len(valid) == len(set(valid)) == 10


def test_training_hosts_each_see_every_dataset():
    mix = Mixture({"a": ListSource(list(range(10))), "b": ListSource(list(range(10)))}, {"a": 1.0, "b": 1.0}, 0)
    sampler = MixtureSampler(mix, shuffle=True, process_count=2, num_epochs=None)
    for host in range(2):  # Grain's DataLoader asks host h for the global indices i * 2 + h
        names = [mix[sampler[i * 2 + host].record_key][0] for i in range(10)]
        assert 2 <= names.count("a") <= 8, names  # not one dataset's contiguous block per host
    epoch0 = {sampler[i * 2].record_key for i in range(10)}
    assert epoch0 != {sampler[20 + i * 2].record_key for i in range(10)}  # dealt anew every epoch


def test_curriculum_filter_and_mixture_weights(shapes_dir):
    cfg = _cfg(shapes_dir)
    src = build_source(cfg.datasets.shapes, max_objects=1)
    assert 0 < len(src) < 48 and all(len(src[i].boxes) == 1 for i in range(len(src)))
    entry = cfg.datasets.shapes.to_dict()
    counts = [len(s.boxes) for s in (build_source(ml_collections.ConfigDict(entry))[i] for i in range(48))]
    crowded = build_source(ml_collections.ConfigDict(entry | {"min_objects": 3}))
    assert len(crowded) == sum(c >= 3 for c in counts) and all(len(crowded[i].boxes) >= 3 for i in range(len(crowded)))
    middle = build_source(ml_collections.ConfigDict(entry | {"min_objects": 2, "max_objects": 3}), max_objects=1)
    assert len(middle) == sum(2 <= c <= 3 for c in counts)  # the entry's bound wins over the section's
    mix = Mixture({"a": ListSource(list(range(30))), "b": ListSource(list(range(10)))}, {"a": 1.0, "b": 3.0}, 0)
    names = [mix[int(k)][0] for k in mix.epoch_keys(0)]
    assert len(names) == 40 and names.count("b") == 30 and names.count("a") == 10


def test_mixture_counts_round_to_the_shares():
    sizes = {"a": ListSource(list(range(2))), "b": ListSource(list(range(47)))}
    assert Mixture(sizes, None, 0).counts.tolist() == [2, 47]  # evaluation: every record once
    three = {n: ListSource(list(range(k))) for n, k in zip("abc", (6, 2, 2))}
    mix = Mixture(three, {"a": 6.1, "b": 2.6, "c": 1.3}, 0)  # shares 6.1, 2.6, 1.3 of 10
    assert mix.counts.tolist() == [6, 3, 1]


def test_down_weighted_dataset_shows_new_records_every_epoch():
    mix = Mixture({"a": ListSource(list(range(1000))), "b": ListSource(list(range(1000)))}, {"a": 1.0, "b": 0.1}, 0)
    sampler = MixtureSampler(mix, shuffle=True, process_count=1, num_epochs=None)
    n = int(mix.counts.sum())
    seen = []
    for epoch in range(5):
        records = [mix[sampler[epoch * n + i].record_key] for i in range(n)]
        seen.append({r for name, r in records if name == "b"})
        assert len(seen[-1]) == mix.counts[1] == 182  # each epoch a subset of b, without repeats
    assert len(set().union(*seen)) > 600  # 5 independent draws of 182 of 1000 cover ~600
    again = MixtureSampler(mix, shuffle=True, process_count=1, num_epochs=None)  # deterministic
    assert [again[3 * n + i].record_key for i in range(50)] == [sampler[3 * n + i].record_key for i in range(50)]


def _bad_records(path):
    image = np.full((20, 30, 3), 128, np.uint8)
    good = {"image": png_bytes(image), "width": 30, "height": 20, "names": ["x"]}

    def ex(key, boxes=((2, 2, 10, 10),), expr="the red circle", **kw):
        return Example(boxes=np.array(boxes, np.float32), tasks={"rec": [{"expr": expr, "obj": 0}]},
                       key=key, **{**good, **kw})

    write_records(path, [
        ex("good0"), ex("corrupt_image", image=b"not a png"), ex("outside", boxes=[(2, 2, 40, 10)]),
        ex("flipped", boxes=[(10, 2, 2, 10)]), ex("too_long", expr="the red circle " * 40),
        ex("stray_boxes", expr="the <boxes> circle"), ex("good1"),
    ])


def _records_cfg(shapes_dir, path, strict=False):
    cfg = _cfg(shapes_dir, strict=strict, tokenizer=str(shapes_dir / "tokenizer"))
    cfg.datasets = {"bad": {"kind": "records", "path": str(path), "split": "", "image_root": "", "weight": 1.0}}
    cfg.task_weights = {"rec": 1.0}
    cfg.batch_size = 2
    return cfg


def test_bad_input_is_skipped_and_counted(shapes_dir, tmp_path):
    _bad_records(tmp_path / "bad.array_record")
    it = _pipe(_records_cfg(shapes_dir, tmp_path / "bad.array_record"), training=False)
    batches = list(it)  # evaluation keeps bad samples as invalid rows: 7 records in batches of 2
    assert [b["valid"].tolist() for b in batches] == [[True, False], [False, False], [False, False], [True, False]]
    assert it.skipped == {"UnidentifiedImageError": 1, "box outside image": 1, "bad box": 1, "too long": 1,
                          "<boxes>/box mismatch": 1}, it.skipped


def test_eval_hosts_with_different_bad_samples_run_the_same_batches(shapes_dir, tmp_path):
    _bad_records(tmp_path / "bad.array_record")
    cfg = _records_cfg(shapes_dir, tmp_path / "bad.array_record")
    cfg.batch_size = 1  # host 0 reads 2 good records of 4, host 1 none of 3 (and one padding slot)
    hosts = [list(_pipe(cfg, training=False, index=i, count=2)) for i in range(2)]
    assert [len(h) for h in hosts] == [4, 4]
    assert [sum(int(b["valid"].sum()) for b in h) for h in hosts] == [2, 0]


def test_a_bad_box_skips_only_the_items_that_use_it(shapes_dir, tmp_path):
    image = png_bytes(np.full((20, 30, 3), 128, np.uint8))
    write_records(tmp_path / "two.array_record", [Example(
        boxes=np.array([(2, 2, 10, 10), (2, 2, 40, 10)], np.float32), image=image, width=30, height=20,
        names=["a", "b"], tasks={"rec": [{"expr": "the red circle", "obj": 0}, {"expr": "the blue circle", "obj": 1}]})])
    cfg = _records_cfg(shapes_dir, tmp_path / "two.array_record")
    cfg.task = "rec"  # each expression its own sample
    it = _pipe(cfg, training=False)
    assert [b["valid"].tolist() for b in it] == [[True, False]] and it.skipped == {"box outside image": 1}


def test_strict_mode_names_file_and_index(shapes_dir, tmp_path):
    _bad_records(tmp_path / "bad.array_record")
    it = _pipe(_records_cfg(shapes_dir, tmp_path / "bad.array_record", strict=True), training=False)
    with pytest.raises(BadSample, match=r"bad\.array_record#1 \(corrupt_image\)"):
        list(it)


def _assert_same_batches(got, want):
    for g, w in zip(got, want, strict=True):
        for k in w:
            np.testing.assert_array_equal(g[k], w[k], err_msg=k)


def _six_batches_of_sparse_good_rows(shapes_dir, tmp_path):
    """2 good records of 7: the loader's batches (of 2) mostly hold bad rows, so a batch of good samples takes
    rows from several of them and the state is often taken part-way through one. -> (config, iterator, the state
    before each of six batches, the batches)."""
    _bad_records(tmp_path / "bad.array_record")
    cfg = _records_cfg(shapes_dir, tmp_path / "bad.array_record")
    it = _pipe(cfg)
    states, batches = [], []
    for _ in range(6):
        states.append(it.get_state())
        batches.append(next(it))
    return cfg, it, states, batches


def test_bad_rows_are_dropped_and_resume_holds_mid_loader_batch(shapes_dir, tmp_path):
    cfg, it, states, batches = _six_batches_of_sparse_good_rows(shapes_dir, tmp_path)
    assert all(b["valid"].all() for b in batches) and sum(it.skipped.values()) >= 5 * 5  # 12 good: 6 epochs
    assert any(json.loads(s)["taken"] for s in states)  # some states fall inside a loader batch
    for i in (1, 3):
        again = _pipe(cfg)
        again.set_state(states[i])
        _assert_same_batches([next(again) for _ in range(6 - i)], batches[i:])
        assert again.skipped == it.skipped


def test_resume_with_a_smaller_batch_continues_where_the_rows_stopped(shapes_dir, tmp_path):
    """A state taken part-way through a loader batch of 2, resumed with batches of 1 (the batch in hand then spans
    two loader batches; it raised IndexError): the same rows follow, in the same order."""
    cfg, _, states, batches = _six_batches_of_sparse_good_rows(shapes_dir, tmp_path)
    rows = [b["input_ids"] for b in batches]
    taken = [json.loads(s)["taken"] for s in states]
    assert 2 in taken  # a state whose whole loader batch was used: two loader batches of 1 now
    for i in sorted({taken.index(t) for t in taken if t}):
        smaller = cfg.copy_and_resolve_references()
        smaller.batch_size = 1
        again = _pipe(smaller)
        again.set_state(states[i])
        want = np.concatenate(rows[i:])
        np.testing.assert_array_equal(np.concatenate([next(again)["input_ids"] for _ in range(len(want))]), want)


def test_workers_batch_in_their_processes_and_resume(shapes_dir):
    cfg = _cfg(shapes_dir, workers=2, read_threads=0, read_buffer=0)
    it = _pipe(cfg)
    next(it)
    state = it.get_state()
    want = [next(it) for _ in range(3)]
    assert all(w["valid"].all() and w["images"].shape[0] == 4 for w in want)
    again = _pipe(cfg)
    again.set_state(state)
    _assert_same_batches([next(again) for _ in range(3)], want)
    # a Ctrl-C at the terminal reaches the process group: only this process may take it (training saves, then
    # stops Grain), not the workers, each of which would die with a traceback
    workers = _descendants(os.getpid())
    assert len(workers) >= 3  # Python's resource tracker and a worker process of each pipeline at least
    assert all(_sigint_held_off(pid) for pid in workers), workers
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, set())


def _descendants(pid: int) -> list[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        try:
            status = (entry / "status").read_text() if entry.name.isdigit() else ""
        except OSError:  # gone meanwhile
            continue
        for line in status.splitlines():
            if line.startswith("PPid:"):
                parents[int(entry.name)] = int(line.split()[1])
    out, frontier = [], {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier}
        out += sorted(frontier)
    return out


def _sigint_held_off(pid: int) -> bool:
    """SIGINT blocked or ignored in process `pid` (Python's resource tracker ignores it; Grain's workers block it)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return bool((int(fields["SigBlk"], 16) | int(fields["SigIgn"], 16)) & (1 << (signal.SIGINT - 1)))


def test_pipeline_config_overrides_replace_whole_sections():
    cfg = pipeline_config(task_weights={"rec": 1.0}, datasets={"mine": {"kind": "records", "path": "x"}})
    assert dict(cfg.task_weights) == {"rec": 1.0}  # not merged with the default task mixture
    assert list(cfg.datasets) == ["mine"]  # the default `shapes` dataset is gone


def test_empty_mixture_names_its_datasets():
    with pytest.raises(ValueError, match="no samples in a, b"):
        Mixture({"a": ListSource([]), "b": ListSource([])}, {"a": 1.0, "b": 1.0}, 0)
    with pytest.raises(ValueError, match="positive weight"):
        Mixture({"a": ListSource([1])}, {"a": 0.0}, 0)
