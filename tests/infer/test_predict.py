"""predict: pixel mapping, prompt references, answer text, drawing, and the command's bad-input errors."""

import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from jaxground.cli import main
from jaxground.data.transforms import boxes_to_square
from jaxground.infer.draw import draw
from jaxground.infer.predict import PredictError, answer_text, boxes_to_pixels, parse_box, prompt_turn
from jaxground.tokens import TokenIds


@pytest.mark.parametrize("hw", [(40, 100), (100, 40), (50, 50)])
def test_boxes_to_pixels_inverts_boxes_to_square(hw):
    h, w = hw
    px = np.array([[1, 2, 30, 39], [0, 0, w, h]], np.float32)
    np.testing.assert_allclose(boxes_to_pixels(boxes_to_square(px, h, w), h, w), px, atol=1e-4)
    # predictions outside the image (in the padding) are clipped to it
    np.testing.assert_allclose(boxes_to_pixels(np.array([[-0.5, -0.5, 1.5, 1.5]]), h, w), [[0, 0, w, h]])


def test_parse_box():
    np.testing.assert_array_equal(parse_box("1,2,30.5,40", 50, 40), [1, 2, 30.5, 40])
    for bad, msg in [("1,2,3", "four"), ("a,b,c,d", "four numbers"), ("5,5,2,9", "x0 < x1"),
                     ("0,0,41,10", "outside"), ("1,2,nan,4", "finite")]:
        with pytest.raises(PredictError, match=msg):
            parse_box(bad, 50, 40)


def test_prompt_turn_references():
    text, groups = prompt_turn("what is [1] holding near [0]?", 2)
    assert text == "what is <loc> holding near <loc>?" and groups == [[1], [0]]
    with pytest.raises(PredictError, match=r"\[2\]"):
        prompt_turn("and [2]?", 2)


WORDS = {10: "a", 11: "cat", 12: "on", 13: "mat", 14: "."}


class WordTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(WORDS[i] for i in ids)


def test_answer_text_numbers_objects_after_the_inputs():
    ids = TokenIds.after(100)
    tokens = np.array([10, 11, ids.at, ids.boxes, 12, 10, 13, ids.at, ids.boxes, 14, ids.eos, 10])
    assert answer_text(tokens, WordTokenizer(), ids, 1, num_objects=2) == "a cat [1] on a mat [2]."


def test_answer_text_numbers_only_objects_with_a_box():
    """Generation records no box for an <at> that ends the answer (no <boxes> forced after it) nor beyond
    max_triggers: such an <at> is [?], and no [k] is printed without its box."""
    ids = TokenIds.after(100)
    trailing = np.array([10, 11, ids.at, ids.boxes, 12, ids.at])
    assert answer_text(trailing, WordTokenizer(), ids, 0, num_objects=1) == "a cat [0] on [?]"
    beyond = np.array([ids.at, ids.boxes, ids.at, ids.boxes, 14, ids.eos])
    assert answer_text(beyond, WordTokenizer(), ids, 0, num_objects=1) == "[0] [?]."


def test_draw_boxes_and_masks():
    image = np.zeros((30, 40, 3), np.uint8)
    masks = np.zeros((1, 30, 40), bool)
    masks[0, 20:, 30:] = True
    out = np.asarray(draw(image, np.array([[2, 14, 20, 28]]), ["[0]"], masks, min_size=0))
    assert out.shape == (30, 40, 3)
    assert out[28, 35].any() and not out[5, 35].any()  # translucent mask inside, untouched outside
    assert out[14, 10].any()  # the box's top edge


def test_draw_enlarges_small_images():
    """A 30x40 image is drawn 7 times larger (280 >= 256 on its longer side), its boxes and masks with it."""
    image = np.zeros((30, 40, 3), np.uint8)
    image[0, 0] = 255
    masks = np.zeros((1, 30, 40), bool)
    masks[0, 20:, 30:] = True
    out = np.asarray(draw(image, np.array([[2, 14, 20, 28]]), ["[0]"], masks))
    assert out.shape == (210, 280, 3)
    assert (out[:7, :7] == 255).all() and not out[7, 7].any()  # one pixel became a 7x7 block
    assert out[20 * 7, 30 * 7].any() and not out[20 * 7 - 1, 30 * 7].any()  # the mask's corner, scaled
    assert out[14 * 7, 10 * 7].any() and not out[14 * 7 + 1, 10 * 7].any()  # the box's top edge, scaled
    assert np.asarray(draw(np.zeros((300, 20, 3), np.uint8), np.zeros((0, 4)), [])).shape == (300, 20, 3)


def test_load_image_orientation_and_bit_depth(tmp_path):
    """EXIF orientation is applied (boxes are given and drawn in the image as viewers show it); 16-bit greyscale
    is scaled to 8 bits (PIL's convert("RGB") clips it to 0 and 255); greyscale without a stated range is refused."""
    from jaxground.infer.command import load_image

    pixels = np.zeros((20, 30, 3), np.uint8)
    pixels[0, 0] = 255  # the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored image is turned 90 degrees clockwise for display
    Image.fromarray(pixels).save(tmp_path / "turned.png", exif=exif)
    shown = load_image(str(tmp_path / "turned.png"))
    assert shown.shape == (30, 20, 3) and (shown[0, -1] == 255).all()  # the corner is now top-right

    grey = np.array([[0, 257 * 29, 65535]], np.uint16)
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I;16")
    np.testing.assert_array_equal(load_image(str(tmp_path / "grey16.png"))[0, :, 0], [0, 29, 255])

    Image.fromarray(np.ones((4, 4), np.float32)).save(tmp_path / "float.tiff")
    with pytest.raises(PredictError, match="no stated range"):
        load_image(str(tmp_path / "float.tiff"))


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(path)
    return path


@pytest.mark.parametrize("extra, message", [
    (["--image", "MISSING"], "image not found"),
    (["--image", "BROKEN"], "cannot decode image"),
    (["--box", "1,2,3"], "expected four"),
    (["--box", "0,0,31,10"], "outside the 30x20 image"),
    (["--prompt", "what is [1]?", "--box", "0,0,5,5"], r"refers to \[1\]"),
    (["--config", "MISSING.py"], "config file not found"),
    (["--out", "FILE/answer.png"], r"--out: .*img.png is a file, not a folder"),
    (["--out", "FOLDER.png"], r"--out: .*folder.png is a folder, not a file"),
    (["--out", "LONG.png"], r"--out: .*File name too long"),
    (["--image", "FOLDER.png"], r"image .*folder.png is a folder, not an image file"),
    (["--image", "BOMB"], r"cannot decode image .*exceeds limit"),  # PIL's decompression-bomb guard
    (["--mask-iou-threshold", "nan"], r"--mask-iou-threshold must be a number, got nan"),  # blanked every mask
])
def test_command_bad_input(tmp_path, image_file, capsys, extra, message):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    bomb = tmp_path / "bomb.png"  # a 1x1 PNG whose header claims 20000x20000 pixels
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(bomb)
    header = b"IHDR" + struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    png = bomb.read_bytes()
    bomb.write_bytes(png[:12] + header + struct.pack(">I", zlib.crc32(header)) + png[33:])
    (tmp_path / "folder.png").mkdir()
    args = ["predict", "--config", "configs/tiny_shapes.py", "--checkpoint", str(tmp_path), "--image", str(image_file),
            "--prompt", "where is [0]?", "--box", "1,1,10,10"]
    for flag, value in zip(extra[::2], extra[1::2]):
        value = {"MISSING": str(tmp_path / "missing.png"), "BROKEN": str(broken),
                 "MISSING.py": str(tmp_path / "missing.py"), "FILE/answer.png": str(image_file / "answer.png"),
                 "FOLDER.png": str(tmp_path / "folder.png"), "LONG.png": str(tmp_path / ("a" * 300 + ".png")),
                 "BOMB": str(bomb)}.get(value, value)
        if flag in args and flag != "--box":
            args[args.index(flag) + 1] = value
        elif flag == "--box":
            args[args.index("--box") + 1] = value
        else:
            args += [flag, value]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "jaxground predict:" in err and "Traceback" not in err
    assert re.search(message, err), err


@pytest.mark.parametrize("lines, message", [
    (["IMG\twhere is it?", "MISSING\twhere is it?"], r"requests.tsv:2: image not found"),
    (["IMG"], r"requests.tsv:1: expected image<TAB>prompt"),
    (["IMG\twhat is [0]?\tout.png\t1,1,10"], r"requests.tsv:1: .*expected four"),
    (["IMG\twhere?\tout.jpg"], r"requests.tsv:1: --out out.jpg: expected a .png path"),
    ([""], "holds no request"),
])
def test_command_bad_list(tmp_path, image_file, capsys, lines, message):
    tsv = tmp_path / "requests.tsv"
    tsv.write_text("\n".join(line.replace("IMG", str(image_file)).replace("MISSING", str(tmp_path / "no.png"))
                             for line in lines) + "\n")
    args = ["predict", "--config", "configs/tiny_shapes.py", "--checkpoint", str(tmp_path), "--list", str(tsv)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "jaxground predict:" in err and "Traceback" not in err
    assert re.search(message, err), err


def test_command_list_excludes_single_request_flags(tmp_path, image_file, capsys):
    tsv = tmp_path / "requests.tsv"
    tsv.write_text(f"{image_file}\twhere?\n")
    assert main(["predict", "--config", "configs/tiny_shapes.py", "--checkpoint", str(tmp_path), "--list", str(tsv),
                 "--image", str(image_file)]) == 2
    assert "--list replaces" in capsys.readouterr().err
    assert main(["predict", "--config", "configs/tiny_shapes.py", "--checkpoint", str(tmp_path)]) == 2
    assert "give --image and --prompt, or --list" in capsys.readouterr().err


def test_rle_round_trip_column_major():
    from jaxground.infer.predict import rle_decode, rle_encode

    rng = np.random.default_rng(0)
    for mask in (rng.random((5, 7)) > 0.5, np.ones((3, 4), bool), np.zeros((2, 2), bool)):
        rle = rle_encode(mask)
        assert rle["size"] == list(mask.shape) and sum(rle["counts"]) == mask.size
        np.testing.assert_array_equal(rle_decode(rle), mask)
    # COCO order: columns first, a leading run of zeros (empty when the first pixel is set)
    assert rle_encode(np.array([[1, 0], [1, 1]], bool))["counts"] == [0, 2, 1, 1]


def test_boxes_to_pixels_orders_corners():
    np.testing.assert_allclose(boxes_to_pixels(np.array([[0.8, 0.9, 0.2, 0.1]]), 10, 10), [[2, 1, 8, 9]], atol=1e-5)


def test_hosts_refuse_together(image_file, monkeypatch):
    """Before the model loads, the processes compare verdicts (`distributed.Hosts`): a refusal on any host is every
    host's, named by its process; hosts whose images, prompts, boxes or checkpoint step differ are refused; agreeing
    hosts go on. Two processes are simulated: `from_every_process` returns this process's verdict and the other's."""
    import dataclasses

    import jax

    from jaxground import distributed
    from jaxground.eval import gather
    from jaxground.infer import command, hosts

    request = command._request(str(image_file), "where is [0]?", ["1,1,10,10"], None)
    others = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(gather, "from_every_process", lambda mine: [mine, others[-1]])

    def verdict(error=None, requests=(request,), checkpoint="step 1"):
        others.append({"error": error, "inputs": {} if error else hosts.predict_inputs(list(requests), checkpoint)})
        return distributed.Hosts(PredictError)

    mine = hosts.predict_inputs([request], "step 1")
    verdict().agree(mine)  # the same request and checkpoint on both: no refusal
    with pytest.raises(PredictError, match=r"^process 1: image not found: b.png$"):
        verdict("image not found: b.png", []).agree(mine)
    for changed in ({"prompt": "where is it [0]?"}, {"boxes": [np.array([1, 1, 10, 11], np.float32)]},
                    {"image": request.image + 1}):
        with pytest.raises(PredictError, match=r"^process 1 read other requests \(image pixels, prompt or boxes\) "
                                               "than process 0: every host"):
            verdict(requests=[dataclasses.replace(request, **changed)]).agree(mine)
    with pytest.raises(PredictError, match=r"^process 1 read other checkpoint than process 0 \(step 7 against step 1\)"):
        verdict(checkpoint="step 7").agree(mine)
    # refused here before comparing: this process joins the comparison and prints the first refusing process's line
    assert verdict().refusal(PredictError("--list x.tsv not found")) == "process 0: --list x.tsv not found"
    assert verdict("no image").refusal(PredictError("no list")) == "process 0: no list"
    agreed = verdict()
    agreed.agree(mine)
    assert agreed.refusal(PredictError("cannot load ckpt")) == "cannot load ckpt"  # after it: its own line


def test_command_ctrl_c_keeps_the_answers_given(tmp_path, image_file, capsys, monkeypatch):
    """Ctrl-C during a --list: the answers printed so far stay, one line on stderr says how many, exit status 130
    (no traceback). The model and its answers are stand-ins; the command around them is the real one."""
    import types

    from jaxground import checkpoint
    from jaxground.data.shapes import write_dataset
    from jaxground.infer import command, predict

    write_dataset(tmp_path / "shapes", train=2, val=1, test=1, size=32)  # the tokenizer the config reads
    answer = types.SimpleNamespace(text="It is [0] .", boxes=np.array([[1.0, 2.0, 3.0, 4.0]]), first_ref=0)
    calls = []

    def stopping_on_the_second(*args, **kwargs):
        calls.append(args[3])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return answer

    monkeypatch.setattr(checkpoint, "identity", lambda path: "step 1")
    monkeypatch.setattr(command, "load_model", lambda *a: types.SimpleNamespace(cfg=types.SimpleNamespace(sam=None)))
    monkeypatch.setattr(predict, "predict", stopping_on_the_second)
    tsv = tmp_path / "requests.tsv"
    tsv.write_text("".join(f"{image_file}\t{q}\n" for q in ("first?", "second?", "third?")))
    code = main(["predict", "--config", "configs/tiny_shapes.py", "--checkpoint", str(tmp_path), "--list", str(tsv),
                 f"data.datasets.shapes.path={tmp_path / 'shapes'}"])
    out, err = capsys.readouterr()
    assert code == 130 and calls == ["first?", "second?"], err
    assert out == f"{image_file}: first?\nIt is [0] .\n[0] 1.0 2.0 3.0 4.0\n"
    assert err.strip() == ("jaxground predict: interrupted after 1 of 3 requests; the answers printed (and their "
                           "--out images) are complete")
