"""Tokenizer, token layouts, p_next, windows, images and frames, against hand-written arrays."""

import numpy as np
import pytest

from flamingo_jax.data import preprocessing
from flamingo_jax.data import sources
from flamingo_jax.data import tokenizer as tok
from data_helpers import FixedRng, ids, solid, tokenizer

BOS, EOS, IMG, EOC, PAD = "<s>", "</s>", "<image>", "<EOC>", "<pad>"


def test_special_ids_are_fixed_and_never_come_from_text():
  tk = tokenizer()
  assert ids(tk, PAD, "<unk>", BOS, EOS, IMG, EOC) == [0, 1, 2, 3, 4, 5]
  assert tok.IMAGE_ID not in tk.encode("look: <image> and <EOC>")
  # No dummy prefix: a leading space is a different first token (leading-space augmentation).
  assert tk.encode("one blue square") == ids(tk, "one", "▁blue", "▁square")
  assert tk.encode(" one blue square") == ids(tk, "▁one", "▁blue", "▁square")
  # Prompts with markers; generated ids decoded up to <EOC>, the model's padded vocabulary
  # rows (ids past the tokenizer's pieces) dropped.
  prompt = tok.encode_with_markers("<image>one blue square<EOC><image>one", tk)
  assert prompt == ids(tk, BOS, IMG, "one", "▁blue", "▁square", EOC, IMG, "one")
  assert tok.decode_until_stop(ids(tk, "▁blue") + [tk.vocab_size, tk.vocab_size + 5]
                               + ids(tk, "▁square", EOC, "▁red"), tk) == "blue square"


DOC_TEXTS = ["a page about shapes.", "two red circles", "one blue square"]
DOC_IMAGE_INDEX = [1, 2]        # image 0 before "two red circles", image 1 before "one blue square"


def test_interleaved_layout_previous_image():
  tk = tokenizer()
  seq = preprocessing.interleaved_tokens(DOC_TEXTS, DOC_IMAGE_INDEX, tk.encode, p_next=False)
  assert seq == ids(tk, BOS, "a", "▁page", "▁about", "▁shapes", ".", EOC,
                    IMG, "two", "▁red", "▁circles", EOC,
                    IMG, "one", "▁blue", "▁square", EOC, EOS)


def test_interleaved_layout_p_next_moves_each_marker_before_the_text_it_follows():
  tk = tokenizer()
  seq = preprocessing.interleaved_tokens(DOC_TEXTS, DOC_IMAGE_INDEX, tk.encode, p_next=True)
  # "a page about shapes." now sees image 0, "two red circles" image 1; the last text, after
  # the last image, keeps image 1 and is one chunk with the text before it (one <EOC>).
  assert seq == ids(tk, BOS, IMG, "a", "▁page", "▁about", "▁shapes", ".", EOC,
                    IMG, "two", "▁red", "▁circles", "▁one", "▁blue", "▁square", EOC, EOS)


# docs/paper.md §2's M3W example, with each chunk split into two texts (two MMC4 sentences, two
# paragraphs): the texts between two images are one chunk, joined by a space, with one <EOC>
# before the next <image> and one after the final text.
PAPER_TEXTS = ["one blue", "square", "two red", "circles", "a green", "triangle"]
PAPER_IMAGES = [2, 4]           # before "two red" and before "a green"


@pytest.mark.parametrize("p_next,expected", [
    (False, [BOS, "one", "▁blue", "▁square", EOC,
             IMG, "two", "▁red", "▁circles", EOC,
             IMG, "a", "▁green", "▁triangle", EOC, EOS]),
    # p_next: each <image> moves to the start of the chunk before it; the last chunk follows
    # the second chunk directly (no image between them): one chunk, one <EOC>.
    (True, [BOS, IMG, "one", "▁blue", "▁square", EOC,
            IMG, "two", "▁red", "▁circles", "▁a", "▁green", "▁triangle", EOC, EOS]),
])
def test_interleaved_layout_is_the_papers_chunks_and_eoc(p_next, expected):
  tk = tokenizer()
  seq = preprocessing.interleaved_tokens(PAPER_TEXTS, PAPER_IMAGES, tk.encode, p_next)
  assert seq == ids(tk, *expected)
  assert seq.count(tok.EOC_ID) == 2 + (not p_next)


def test_long_captions_are_truncated_not_dropped():
  tk = tokenizer()
  full = preprocessing.pair_tokens("two red circles", tk.encode, False, max_tokens=None)
  assert full == ids(tk, BOS, IMG, "two", "▁red", "▁circles", EOC, EOS)
  assert preprocessing.pair_tokens("two red circles", tk.encode, False, max_tokens=4) == \
      ids(tk, BOS, IMG, "two", "▁red", "▁circles")
  assert preprocessing.pair_tokens("two red circles", tk.encode, False, max_tokens=6) == full


@pytest.mark.parametrize("p_next,expected", [
    # [img0, img1, "two red circles", img2]: consecutive and trailing images.
    (False, [BOS, IMG, IMG, "two", "▁red", "▁circles", EOC, IMG, EOS]),
    (True, [BOS, IMG, IMG, IMG, "two", "▁red", "▁circles", EOC, EOS]),
])
def test_interleaved_layout_edge_cases(p_next, expected):
  tk = tokenizer()
  seq = preprocessing.interleaved_tokens(["two red circles"], [0, 0, 1], tk.encode, p_next)
  assert seq == ids(tk, *expected)


def test_window_keeps_first_markers_and_drops_later_ones():
  seq = [2, 4, 10, 4, 11, 4, 12, 4, 13, 3]         # four markers
  tokens, kept = preprocessing.window(seq, length=7, max_media=2, rng=FixedRng(integers=1))
  # Window = seq[1:9] = [4, 10, 4, 11, 4, 12, 4, 13]; markers 0, 1 kept, 2 and 3 removed.
  assert tokens == [4, 10, 4, 11, 12, 13]
  assert kept == [0, 1]
  tokens, kept = preprocessing.window(seq, length=7, max_media=5, rng=FixedRng(integers=2))
  assert tokens == [10, 4, 11, 4, 12, 4, 13, 3] and kept == [1, 2, 3]


# Three images, before the 2nd, 3rd and 4th text. Without p_next the document is
#  0 BOS 1 a 2 ▁page 3 ▁about 4 ▁shapes 5 . 6 EOC 7 IMG 8 two 9 ▁red 10 ▁circles 11 EOC
#  12 IMG 13 one 14 ▁blue 15 ▁square 16 EOC 17 IMG 18 a 19 ▁green 20 ▁triangle 21 EOC 22 EOS;
# with p_next each marker moves before the chunk it followed, and the last text (no image
# after it) joins the chunk before it:
#  0 BOS 1 IMG 2 a 3 ▁page 4 ▁about 5 ▁shapes 6 . 7 EOC 8 IMG 9 two 10 ▁red 11 ▁circles
#  12 EOC 13 IMG 14 one 15 ▁blue 16 ▁square 17 ▁a 18 ▁green 19 ▁triangle 20 EOC 21 EOS.
EDGE_TEXTS = ["a page about shapes.", "two red circles", "one blue square", "a green triangle"]
EDGE_IMAGES = [1, 2, 3]


@pytest.mark.parametrize("p_next,start,length,max_media,pieces,kept,phi", [
    # A window that starts inside a chunk: that partial chunk sees no image (its image is
    # before the window), and the kept images are the document's images 1 and 2, not 0 and 1.
    (False, 9, 8, 5, ["▁red", "▁circles", EOC, IMG, "one", "▁blue", "▁square", EOC, IMG],
     [1, 2], [0, 0, 0, 1, 1, 1, 1, 1]),
    # More markers than slots: the later marker goes, its text stays (it sees the last kept
    # image, docs/paper.md §9.4 leaves this open).
    (False, 9, 12, 1, ["▁red", "▁circles", EOC, IMG, "one", "▁blue", "▁square", EOC,
                       "a", "▁green", "▁triangle", EOC], [1], [0, 0, 0] + [1] * 9),
    # p_next, starting inside the first chunk: its image (moved before it) is outside.
    (True, 3, 8, 5, ["▁page", "▁about", "▁shapes", ".", EOC, IMG, "two", "▁red", "▁circles"],
     [1], [0, 0, 0, 0, 0, 1, 1, 1]),
    # p_next, the end of the document: the text after the last image is in the window and
    # keeps that image; <EOS> ends the row.
    (True, 13, 8, 5, [IMG, "one", "▁blue", "▁square", "▁a", "▁green", "▁triangle", EOC, EOS],
     [2], [1] * 8),
])
def test_window_edges_on_a_hand_written_document(p_next, start, length, max_media, pieces, kept,
                                                 phi):
  from flamingo_jax.models import gated_xattn  # pylint: disable=g-import-not-at-top
  tk = tokenizer()
  seq = preprocessing.interleaved_tokens(EDGE_TEXTS, EDGE_IMAGES, tk.encode, p_next)
  tokens, kept_images = preprocessing.window(seq, length, max_media, FixedRng(integers=start))
  assert tokens == ids(tk, *pieces)
  assert kept_images == kept
  row = preprocessing.to_arrays(tokens, length)
  got_phi = gated_xattn.media_positions(row["input_ids"][None], tok.IMAGE_ID)[0]
  np.testing.assert_array_equal(got_phi, phi)
  assert int(got_phi.max()) <= max_media          # no token points past the kept images


def test_to_arrays_targets_and_loss_mask():
  rows = preprocessing.to_arrays([2, 4, 20, 21, 5, 3], length=8)
  np.testing.assert_array_equal(rows["input_ids"], [2, 4, 20, 21, 5, 3, 0, 0])
  np.testing.assert_array_equal(rows["target_ids"], [4, 20, 21, 5, 3, 0, 0, 0])
  np.testing.assert_array_equal(rows["loss_mask"], [0, 1, 1, 1, 1, 0, 0, 0])  # not <image>, not pad
  with pytest.raises(sources.Skip, match="text_too_long"):
    preprocessing.to_arrays(list(range(10)), length=8)


def test_resize_keeps_aspect_and_pads_with_the_model_mean():
  image = np.zeros((32, 128, 3), np.uint8)          # 4:1 wide, black
  image[:, 64:] = 255                               # right half white
  out = preprocessing.resize_and_pad(image, 64)
  # 128x32 -> 64x16, centred: rows 24..39 hold the image, the rest is the pad colour.
  np.testing.assert_array_equal(out[:24], np.broadcast_to(preprocessing.PAD_RGB, (24, 64, 3)))
  np.testing.assert_array_equal(out[40:], np.broadcast_to(preprocessing.PAD_RGB, (24, 64, 3)))
  assert (out[24:40, :31] == 0).all() and (out[24:40, 33:] == 255).all()
  flipped = preprocessing.resize_and_pad(image, 64, flip=True)
  assert (flipped[24:40, :31] == 255).all() and (flipped[24:40, 33:] == 0).all()


def test_pad_colour_matches_the_model_normalisation():
  from flamingo_jax.models import flamingo  # pylint: disable=g-import-not-at-top
  np.testing.assert_array_equal(preprocessing.PAD_RGB, np.round(flamingo.PIXEL_MEAN))


def test_colour_jitter_changes_pixels_within_range():
  image = solid((100, 150, 200), 64, 64)
  colors = preprocessing.color_factors(0.4, np.random.default_rng(0))
  assert np.all(np.abs(colors - 1) <= 0.4)
  out = preprocessing.resize_and_pad(image, 64, colors=colors)
  assert not np.array_equal(out, image) and out.dtype == np.uint8
  assert preprocessing.color_factors(0.0, np.random.default_rng(0)) is None


def test_frame_indices():
  # 20 frames at 2 fps = 10 s; 8 frames 1 s apart from the centred start (slack 10-7-0.5=2.5).
  np.testing.assert_array_equal(preprocessing.frame_indices(20, 2.0, 8, 1.0, None),
                                [2, 4, 6, 8, 10, 12, 14, 16])
  # Evaluation: 30 frames at 3 fps from a 15 s clip at 30 fps, centred (start 2.65 s).
  np.testing.assert_array_equal(preprocessing.frame_indices(450, 30.0, 30, 3.0, None),
                                79 + 10 * np.arange(30))
  # A clip shorter than the span repeats its last frame.
  np.testing.assert_array_equal(preprocessing.frame_indices(3, 1.0, 5, 1.0, None), [0, 1, 2, 2, 2])
