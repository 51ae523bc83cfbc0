"""Cached generation, beam search, sampling and scoring (flamingo_jax/inference) against the
uncached full forward, on the tiny config with opened gates (so media matter)."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax import inference
from flamingo_jax import models
from flamingo_jax.training import sharding
from model_helpers import random_media, set_gates

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def setup(tiny_config):
  cfg = tiny_config.model
  media = np.asarray(random_media(0, (4, 3, 1, cfg.image_size, cfg.image_size, 3)))
  rs = np.random.RandomState(1)
  image = cfg.image_token_id
  words = lambda n: list(rs.randint(6, cfg.vocab_size, n))
  # Ragged prompts with 3, 1, 0 and 2 images; row 1 has text before its first image.
  prompts = [[2, image] + words(5) + [image] + words(3) + [image] + words(2),
             words(4) + [image] + words(9),
             words(3),
             [2, image, image] + words(6)]
  model = models.make_flamingo(cfg)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32),
                               jnp.asarray(media[:1]))
  params = set_gates(params, 0.7)
  engine = inference.Engine(cfg, params, max_slots=64)
  full = jax.jit(lambda ids, m: model.apply(params, None, ids, m))
  return cfg, engine, full, prompts, media


def full_log_likelihood(full, prompt, tokens, media_row):
  logits = full(jnp.asarray([list(prompt) + list(tokens)]), jnp.asarray(media_row[None]))
  log_probs = np.asarray(jax.nn.log_softmax(logits[0], axis=-1))
  return sum(float(log_probs[len(prompt) - 1 + j, t]) for j, t in enumerate(tokens))


@pytest.mark.slow
def test_cached_greedy_equals_the_uncached_loop(setup):
  cfg, engine, full, prompts, media = setup
  results = inference.generate(engine, prompts, media, max_new_tokens=NEW_TOKENS)
  for i, prompt in enumerate(prompts):
    # Full forward at the final length (one compile per row): causal, so the not yet
    # generated tail does not change the logits at the current position.
    seq = np.zeros(len(prompt) + NEW_TOKENS, np.int32)
    seq[:len(prompt)] = prompt
    for t in range(len(prompt), len(seq)):
      logits = full(jnp.asarray(seq[None]), jnp.asarray(media[i:i + 1]))
      seq[t] = int(jnp.argmax(logits[0, t - 1]))
    assert results[i][0].tokens == seq[len(prompt):].tolist(), i


@pytest.mark.slow
def test_cached_step_logits_equal_the_full_forward(setup):
  cfg, engine, full, prompts, media = setup
  ids, lengths, media_p, _ = inference.decoding.prepare(engine, prompts, media, 8)
  prompt = engine.prefill(ids, lengths, engine.encode(media_p))
  cache, positions, phi = prompt.cache, prompt.positions, prompt.phi
  extra = np.random.RandomState(2).randint(6, cfg.vocab_size, (len(prompts), 6))
  for t in range(6):
    token = jnp.asarray(extra[:, t], jnp.int32)
    logits, cache = engine.step(token, positions, phi, cache)
    positions = positions + 1
    for i, p in enumerate(prompts):
      reference = full(jnp.asarray([list(p) + extra[i, :t + 1].tolist()]),
                       jnp.asarray(media[i:i + 1]))[0, -1]
      np.testing.assert_allclose(logits[i], reference, atol=1e-5)
  for i, p in enumerate(prompts):   # the prefill's last-token logits too
    reference = full(jnp.asarray([p]), jnp.asarray(media[i:i + 1]))[0, -1]
    np.testing.assert_allclose(prompt.logits[i], reference, atol=1e-5)


def test_the_decode_step_writes_the_cache_in_place(setup):
  """The step's working memory is a fraction of its KV cache: the cache is donated, carried
  through the layer scans and scattered into, never copied whole (before: 2x the cache)."""
  cfg, engine, full, prompts, media = setup
  ids, lengths, media_p, _ = inference.decoding.prepare(engine, prompts, media, 8)
  big = inference.Engine(cfg, engine.params, max_slots=1024)
  prompt = big.prefill(ids, lengths, big.encode(media_p))
  compiled = big._step.lower(big.params, prompt.positions, prompt.positions, prompt.phi,
                             prompt.cache).compile()
  memory = compiled.memory_analysis()
  cache_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(prompt.cache))
  assert memory.alias_size_in_bytes >= cache_bytes
  assert memory.temp_size_in_bytes < cache_bytes / 2, (memory.temp_size_in_bytes, cache_bytes)


@pytest.mark.slow
def test_beam_search(setup):
  cfg, engine, full, prompts, media = setup
  stop = (cfg.eoc_token_id,)
  greedy = inference.generate(engine, prompts, media, max_new_tokens=10, stop_ids=stop)
  beam1 = inference.generate(engine, prompts, media, max_new_tokens=10, method="beam",
                             beam_width=1, stop_ids=stop)
  beam3 = inference.generate(engine, prompts, media, max_new_tokens=10, method="beam",
                             beam_width=3, num_return=3, stop_ids=stop)
  for i, prompt in enumerate(prompts):
    assert beam1[i][0].tokens == greedy[i][0].tokens
    hyps = beam3[i]
    assert len(hyps) == 3 and len({tuple(h.tokens) for h in hyps}) == 3
    assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
    for h in hyps:
      assert h.score == h.log_prob                                  # length_penalty 0
      assert h.log_prob == pytest.approx(full_log_likelihood(full, prompt, h.tokens, media[i]),
                                         abs=1e-4)
  # Beam search need not beat greedy (greedy's prefix can fall out of the beam: this random
  # model has such a row), but one step is exact: the W most likely first tokens, in order.
  one = inference.generate(engine, prompts, media, max_new_tokens=1, method="beam",
                           beam_width=3, num_return=3)
  for i, prompt in enumerate(prompts):
    logits = full(jnp.asarray([prompt]), jnp.asarray(media[i:i + 1]))[0, -1]
    assert [h.tokens[0] for h in one[i]] == np.argsort(-np.asarray(logits))[:3].tolist()


@pytest.mark.slow
def test_an_xattn_offset_generates_what_its_full_forward_gives(tiny_config):
  """xattn.offset=1 with every=2 (OpenFlamingo's placement: before LM blocks 1 and 3 of 5):
  one head block with no xattn before it, whose cache is carried and reordered by beam
  search like the others."""
  cfg = copy.deepcopy(tiny_config.model)
  cfg.xattn.offset = 1
  image, size = cfg.image_token_id, cfg.image_size
  media = np.asarray(random_media(3, (2, 2, 1, size, size, 3)))
  prompts = [[2, image, 7, 8, 9, image, 10, 11], [12, 13, image, 14]]
  model = models.make_flamingo(cfg)
  params = set_gates(jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 8), jnp.int32),
                                         jnp.asarray(media[:1])), 0.7)
  lm = "flamingo/language_model"
  assert params[f"{lm}/head_blocks/block/self_attention/query"]["w"].shape[0] == 1
  assert params[f"{lm}/groups/xattn"]["alpha_xattn"].shape == (2,)
  assert not any("tail" in module for module in params)
  assert models.count_params(cfg)["xattn"] < models.count_params(tiny_config.model)["xattn"]
  engine = inference.Engine(cfg, params, max_slots=32)
  full = jax.jit(lambda ids, m: model.apply(params, None, ids, m))
  hyps = inference.generate(engine, prompts, media, max_new_tokens=5, method="beam",
                            beam_width=2, num_return=2)
  for i, prompt in enumerate(prompts):
    for h in hyps[i]:
      assert h.log_prob == pytest.approx(full_log_likelihood(full, prompt, h.tokens, media[i]),
                                         abs=1e-4)


def test_rows_stop_at_their_own_stop_token(setup):
  cfg, engine, full, prompts, media = setup
  free = inference.generate(engine, prompts, media, max_new_tokens=12)
  stop_token = free[0][0].tokens[3]                    # row 0 emits it at step 3
  assert stop_token not in free[1][0].tokens[:12]
  stopped = inference.generate(engine, prompts, media, max_new_tokens=12, stop_ids=(stop_token,))
  assert stopped[0][0].tokens == free[0][0].tokens[:free[0][0].tokens.index(stop_token) + 1]
  assert stopped[1][0].tokens == free[1][0].tokens                 # the others go on


@pytest.mark.slow
def test_sampling_is_seeded_and_respects_top_k(setup):
  cfg, engine, full, prompts, media = setup
  run = lambda seed, **kw: [r[0].tokens for r in inference.generate(
      engine, prompts, media, max_new_tokens=8, method="sample", seed=seed, **kw)]
  assert run(3, temperature=1.5) == run(3, temperature=1.5)
  assert run(3, temperature=1.5) != run(4, temperature=1.5)
  assert run(5, top_k=1) == [r[0].tokens for r in inference.generate(
      engine, prompts, media, max_new_tokens=8)]                      # top-1 sampling = greedy
  assert run(6, top_p=1e-6) == run(7, top_p=1e-6)                     # only the top token left


@pytest.mark.slow
def test_sampling_is_independent_of_the_batch_composition(setup):
  """A prompt's sample depends on the seed and the prompt, not on its neighbours or its
  row; explicit row_seeds override."""
  cfg, engine, full, prompts, media = setup
  sample = lambda rows, **kw: [r[0].tokens for r in inference.generate(
      engine, [prompts[i] for i in rows], media[list(rows)], max_new_tokens=10,
      method="sample", temperature=2.0, seed=11, **kw)]
  together = sample((0, 1, 2, 3))
  assert sample((3, 0)) == [together[3], together[0]]
  assert sample((1,)) == [together[1]]
  assert sample((0, 1), row_seeds=(5, 5)) != sample((0, 1), row_seeds=(6, 6))


@pytest.mark.slow
def test_decoding_is_one_device_loop_that_returns_once(setup, monkeypatch):
  """No per-token round trip: generate reads the device once (the finished tokens and
  scores), and never calls the per-token step."""
  cfg, engine, full, prompts, media = setup
  reads = []
  original = engine.to_host
  monkeypatch.setattr(engine, "to_host", lambda x: reads.append(1) or original(x))
  monkeypatch.setattr(engine, "step", lambda *a: pytest.fail("a per-token step was called"))
  for method in ("greedy", "sample", "beam"):
    reads.clear()
    inference.generate(engine, prompts, media, max_new_tokens=9, method=method)
    assert len(reads) == 1, method


def test_streaming_yields_every_k_tokens_what_generate_gives(setup):
  cfg, engine, full, prompts, media = setup
  final = [r[0].tokens for r in inference.generate(engine, prompts, media, max_new_tokens=10)]
  chunks = list(inference.stream(engine, prompts, media, every=3, max_new_tokens=10))
  assert [len(c[0]) for c in chunks] == [3, 6, 9, 10]
  for earlier, later in zip(chunks, chunks[1:]):
    assert all(later[i][:len(earlier[i])] == earlier[i] for i in range(len(prompts)))
  assert chunks[-1] == final
  sampled = list(inference.stream(engine, prompts, media, every=4, max_new_tokens=10,
                                  method="sample", seed=3))[-1]
  assert sampled == [r[0].tokens for r in inference.generate(
      engine, prompts, media, max_new_tokens=10, method="sample", seed=3)]


def test_the_decode_loop_writes_the_cache_in_place(setup):
  """The whole loop's working memory is a fraction of the KV cache it carries: the cache is
  donated to it and written in place token after token."""
  cfg, engine, full, prompts, media = setup
  big = inference.Engine(cfg, engine.params, max_slots=1024)
  ids, lengths, media_p, count = inference.decoding.prepare(big, prompts, media, 8)
  prompt = big.prefill(ids, lengths, big.encode(media_p))
  start, loop = inference.decoding._sampler(big, "greedy", 0, 8)  # pylint: disable=protected-access
  keys = inference.decoding._row_keys(big, prompts, count, ids.shape[0], 0, None)  # pylint: disable=protected-access
  stop = np.asarray([-1], np.int32)
  state = start(prompt._replace(cache=None), prompt.cache, keys, np.float32(1), np.float32(1),
                stop, 8)
  compiled = loop.lower(big.params, state, np.float32(1), np.float32(1), stop,
                        np.int32(8)).compile()
  memory = compiled.memory_analysis()
  cache_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state["cache"]))
  assert memory.alias_size_in_bytes >= cache_bytes
  assert memory.temp_size_in_bytes < cache_bytes / 2, (memory.temp_size_in_bytes, cache_bytes)


def test_scoring_equals_full_forward_log_likelihoods(setup):
  cfg, engine, full, prompts, media = setup
  candidates = [[[7, 8, 9], [10]], [[11, 12], [13, 14, 15, 16, 17], [18]], [[19, 20, 21, 22]],
                [[23], [24, 25]]]
  scores = inference.score(engine, prompts, media, candidates, batch=4)
  for i, cands in enumerate(candidates):
    for c, (total, mean) in zip(cands, scores[i]):
      expected = full_log_likelihood(full, prompts[i], c, media[i])
      assert total == pytest.approx(expected, abs=1e-4)
      assert mean == pytest.approx(expected / len(c), abs=1e-4)


@pytest.mark.slow
def test_thirty_frame_video_on_a_model_built_for_eight(tiny_config):
  cfg = copy.deepcopy(tiny_config.model)
  cfg.resampler.num_time_embeddings, cfg.resampler.max_frames = 8, 32
  model = models.make_flamingo(cfg)
  video = np.asarray(random_media(3, (1, 1, 30, cfg.image_size, cfg.image_size, 3)))
  params = set_gates(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32),
                                         jnp.asarray(video[:, :, :8])), 0.7)
  engine = inference.Engine(cfg, params, max_slots=32)
  prompt = [2, cfg.image_token_id, 40, 41]
  out = inference.generate(engine, [prompt], video, max_new_tokens=6)[0][0].tokens
  seq = list(prompt)
  for _ in range(6):
    seq.append(int(jnp.argmax(model.apply(params, None, jnp.asarray([seq]),
                                          jnp.asarray(video))[0, -1])))
  assert out == seq[len(prompt):]


@pytest.mark.slow
def test_sharded_generation_equals_one_device(setup):
  cfg, engine, full, prompts, media = setup
  mesh = sharding.make_mesh(4, 2)
  specs = sharding.param_specs(engine.params, sharding.rules_for(cfg, 2))
  params = jax.device_put(engine.params, sharding.named(mesh, specs))
  sharded = inference.Engine(cfg, params, max_slots=64, mesh=mesh)
  for method in ("greedy", "beam"):
    a = inference.generate(engine, prompts, media, max_new_tokens=10, method=method)
    b = inference.generate(sharded, prompts, media, max_new_tokens=10, method=method)
    assert [r[0].tokens for r in a] == [r[0].tokens for r in b], method
  ids, lengths, padded_media, _ = inference.decoding.prepare(sharded, prompts, media, 4)
  k = sharded.prefill(ids, lengths, sharded.encode(padded_media)).cache["groups"]["self"]["k"]
  assert tuple(k.sharding.spec)[:4] == ("data", None, None, "model")   # [B, G, k, H, S, K]


def test_bad_input_is_a_clear_error(setup):
  cfg, engine, full, prompts, media = setup
  with pytest.raises(ValueError, match=r"prompt 0 has 3 <image> tokens but only 2 media"):
    inference.generate(engine, prompts, media[:, :2])
  with pytest.raises(ValueError, match=r"prompt 1 has 60 tokens; with max_new_tokens=8 it "
                                       r"needs 68 positions but the maximum length is 64"):
    inference.generate(engine, [[7], [7] * 60], None, max_new_tokens=8)
  with pytest.raises(ValueError, match="method 'nucleus'"):
    inference.generate(engine, prompts, media, method="nucleus")


# --- the generate command line --------------------------------------------------------------

def run_generate(*args):
  import os, subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  from conftest import REPO  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "flamingo_jax.generate", *args], env=env,
                        cwd=REPO, capture_output=True, text=True)


@pytest.mark.slow
def test_generate_command_line(tmp_path):
  import json, os  # pylint: disable=g-import-not-at-top,multiple-imports
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from conftest import REPO, config_path  # pylint: disable=g-import-not-at-top
  from flamingo_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  from flamingo_jax.weights import imports  # pylint: disable=g-import-not-at-top
  lm = str(tmp_path / "lm")
  imports.run_lm("gpt_neox", os.path.join(REPO, "tests", "data", "hf_lms", "gpt_neox"), lm,
                     progress=False)
  image = synthetic.scene(np.random.default_rng(0), 80)[0]
  Image.fromarray(image).save(tmp_path / "a.png")
  common = [f"--config={config_path('pretrained')}:lm={lm}", f"--params={lm}",
            "--max_new_tokens=5"]
  one = run_generate(*common, "--prompt=<image>Output:", f"--image={tmp_path / 'a.png'}")
  assert one.returncode == 0, one.stderr[-3000:]
  assert len(one.stdout.splitlines()) == 1
  beam = run_generate(*common, "--prompt=<image>Output:", f"--image={tmp_path / 'a.png'}",
                      "--beam=3")
  assert beam.returncode == 0, beam.stderr[-3000:]
  sharded = run_generate(*common, "--prompt=<image>Output:", f"--image={tmp_path / 'a.png'}",
                         "--mesh=data=4,model=2")                 # 8 fake devices (conftest)
  assert sharded.returncode == 0, sharded.stderr[-3000:]
  assert sharded.stdout == one.stdout
  streamed = run_generate(*common, "--prompt=<image>Output:", f"--image={tmp_path / 'a.png'}",
                          "--stream_every=2")            # printed as it grows: the same line
  assert streamed.returncode == 0 and streamed.stdout == one.stdout, streamed.stderr[-3000:]
  rows = [{"prompt": "<image>Output:", "images": ["a.png"]},
          {"prompt": "<image>Output:", "images": ["missing.png"]},
          {"prompt": "<image><image>two", "images": ["a.png"]},
          {"prompt": "no image here"}]
  with open(tmp_path / "rows.jsonl", "w") as f:
    f.write("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
  batch = run_generate(*common, f"--batch_file={tmp_path / 'rows.jsonl'}")
  assert batch.returncode == 0, batch.stderr[-3000:]
  lines = batch.stdout.split("\n")[:5]
  assert lines[0] == one.stdout.strip()                # same row, same greedy output
  assert lines[1] == lines[2] == lines[4] == ""
  assert "skipped row 2: missing_file" in batch.stderr
  assert "skipped row 3: the prompt has 2 <image> token(s) but 1 media item(s)" in batch.stderr
  assert "skipped row 5: line 5" in batch.stderr and "3 of 5 row(s) skipped" in batch.stderr
  bad = run_generate(*common, "--prompt=<image><image>", f"--image={tmp_path / 'a.png'}")
  assert bad.returncode == 1 and "2 <image> token(s) but 1 media" in bad.stderr


def test_aot_compile_of_generation_reports_memory(tiny_config):
  from flamingo_jax.tools import aot_compile  # pylint: disable=g-import-not-at-top
  report = aot_compile.generate_report(copy.deepcopy(tiny_config), "cpu", "data=4,model=2",
                                       batch=8, context=64, images=3, dtype="bfloat16")
  assert report["mesh"] == {"data": 4, "model": 2}
  # Per device: 2 of 8 rows, 2 of 4 heads, 64 slots, key size 16, k and v, 5 layers, bf16.
  assert report["cache_bytes_per_device"] >= 5 * 2 * 2 * 64 * 2 * 16 * 2
  for part in ("encode", "prefill", "decode_step"):
    assert report[part]["total_bytes"] > 0
  assert report["decode_step"]["alias_bytes"] > 0          # the cache is donated, updated in place


@pytest.mark.slow
def test_two_processes_generate_what_one_process_does(tmp_path):
  """2 processes x 2 devices (gloo) vs 1 process x 4 devices, both on a 2 x 2 mesh: the same
  greedy and beam tokens and the same candidate scores."""
  import json, os, socket, subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  from conftest import REPO, XLA_TEST_FLAGS  # pylint: disable=g-import-not-at-top
  script = os.path.join(REPO, "tests", "generate_processes.py")
  env = lambda n: dict(os.environ, JAX_PLATFORMS="cpu",
                       XLA_FLAGS=f"--xla_force_host_platform_device_count={n} {XLA_TEST_FLAGS}")
  one = subprocess.run([sys.executable, script, str(tmp_path / "one.json")], env=env(4),
                       capture_output=True, text=True)
  assert one.returncode == 0, one.stderr[-3000:]
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen([sys.executable, script, str(tmp_path / "two.json"),
                             f"127.0.0.1:{port}", "2", str(i)], env=env(2),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
  outputs = [p.communicate(timeout=600)[0].decode(errors="replace") for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
  with open(tmp_path / "one.json") as f, open(tmp_path / "two.json") as g:
    expected, got = json.load(f), json.load(g)
  assert got["greedy"] == expected["greedy"] and got["beam"] == expected["beam"]
  np.testing.assert_allclose(got["scores"], expected["scores"], atol=1e-5)
  np.testing.assert_allclose(got["beam_log_prob"], expected["beam_log_prob"], atol=1e-5)
