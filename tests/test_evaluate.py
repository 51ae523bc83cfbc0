"""Few-shot evaluation: the harness (prompts per query, scoring with ensembling, generation,
the store it resumes from), the metric of stored rows, the evaluate command and the demo's
report. The tiny model has random weights with its tanh gates opened, so images matter."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import REPO, config_path
from flamingo_jax.data import synthetic
from flamingo_jax.data import tokenizer as tok
from flamingo_jax.evaluation import harness as harness_lib
from flamingo_jax.evaluation import tasks
from flamingo_jax import inference, models
from flamingo_jax.training import param_sources
from model_helpers import set_gates


@pytest.fixture(scope="module")
def tiny(tiny_config):
  cfg = tiny_config.model
  params = models.make_flamingo(cfg).init(
      jax.random.key(0), np.zeros((1, 4), np.int32),
      np.zeros((1, 1, 1, cfg.image_size, cfg.image_size, 3), np.uint8))
  return tiny_config, set_gates(params, 1.0), tok.load(tiny_config.data.tokenizer_path)


def make_harness(tiny, task_name, data_dir, store_path, mesh="", **settings):
  config, params, tokenizer = tiny
  placed, mesh = param_sources.place(config, params, mesh)
  task = tasks.get(task_name)
  return harness_lib.Harness(
      task, task.load(data_dir), harness_lib.Settings(task=task_name, **settings), tokenizer,
      lambda slots: inference.Engine(config.model, placed, max_slots=slots, mesh=mesh),
      harness_lib.Store(store_path), image_size=config.model.image_size)


def write_captions(root, train=4, test=5):
  """A COCO Karpathy-split file of synthetic scenes captioned by their attributes."""
  rng = np.random.default_rng(0)
  images = []
  for k in range(train + test):
    image, attrs = synthetic.scene(rng, 64)
    split = "train" if k < train else "test"
    name = f"COCO_{split}_{k}.png"
    os.makedirs(os.path.join(root, split), exist_ok=True)
    Image.fromarray(image).save(os.path.join(root, split, name))
    images.append({"filepath": split, "filename": name, "split": split, "cocoid": k,
                   "sentences": [{"raw": synthetic.caption(attrs)},
                                 {"raw": f"a picture of {synthetic.caption(attrs)}"}]})
  with open(os.path.join(root, "dataset_coco.json"), "w") as f:
    json.dump({"images": images}, f)
  return root


@pytest.mark.slow
def test_score_task_is_mesh_independent_and_ensembles_average_shot_orders(tiny, tmp_path):
  synthetic.write_naming_task(str(tmp_path / "naming"), seed=1, support=8, queries=6, size=64)
  one = make_harness(tiny, "naming", str(tmp_path / "naming"), str(tmp_path / "one.jsonl"),
                     ensemble=3, batch_size=4)
  sharded = make_harness(tiny, "naming", str(tmp_path / "naming"), str(tmp_path / "mesh.jsonl"),
                         mesh="data=4,model=2", ensemble=3, batch_size=4)
  for shots in (0, 3):
    one.run(shots)
    sharded.run(shots)
    a, b = one.store.of(shots), sharded.store.of(shots)
    assert [r["id"] for r in a] == [q.id for q in one.queries] == [r["id"] for r in b]
    for x, y in zip(a, b):
      assert x["output"] == y["output"] and x["prompt"] == y["prompt"]
      np.testing.assert_allclose([x["scores"][c] for c in one.candidates],
                                 [y["scores"][c] for c in one.candidates], rtol=1e-5, atol=1e-5)
  # Zero-shot close-ended: the query alone.
  assert one.store.of(0)[0]["prompt"] == "<image>this is a"
  # Query 1 at 3 shots: its three orders scored one by one, averaged, give the stored scores.
  _, params, tokenizer = tiny
  engine = inference.Engine(tiny[0].model, params, max_slots=128)
  orders = one._orders(1, 3)                                 # pylint: disable=protected-access
  assert len(orders) == 3 and orders[0] is None and sorted(orders[1]) == [0, 1, 2]
  per_order = []
  for order in orders:
    prompt = one.prompt_of(1, 3, order)
    media = np.stack([one._load(m) for m in prompt.media])[None]  # pylint: disable=protected-access
    scores = inference.score(engine, [tok.encode_with_markers(prompt.text, tokenizer)], media,
                             [one.candidate_tokens(prompt.text)])[0]
    per_order.append([s for s, _ in scores])
  row = one.store.of(3)[1]
  np.testing.assert_allclose([row["scores"][c] for c in one.candidates],
                             np.mean(per_order, axis=0), rtol=1e-5, atol=1e-5)
  assert row["output"] == one.candidates[int(np.argmax(np.mean(per_order, axis=0)))]
  # RICES: support image 5 replaced by query 2's own image is query 2's nearest shot, placed
  # directly before it; the features are cached in the output folder.
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copy(one.queries[2].media, one.support[5].media)
  rices = make_harness(tiny, "naming", str(tmp_path / "naming"), str(tmp_path / "r.jsonl"),
                       rices=True)
  rices.feature_cache = str(tmp_path / "features")
  assert rices.shots_of(2, 3)[-1] == 5 and len(set(rices.shots_of(2, 3))) == 3
  assert rices.prompt_of(2, 3).media[-2:] == [one.support[5].media, one.queries[2].media]
  assert os.path.exists(tmp_path / "features" / "support_features.npy")
  # A bound word continues "this is a" as the one token it is in running text.
  assert [len(t) for t in one.candidate_tokens("<image>this is a")] == [1, 1, 1]


@pytest.mark.slow
def test_generation_resumes_from_a_torn_store_without_redoing_queries(tiny, tmp_path):
  root = write_captions(str(tmp_path / "coco"))
  path = str(tmp_path / "predictions.jsonl")
  settings = dict(max_new_tokens=4, batch_size=2, support_size=3)

  class Interrupt(Exception):
    pass

  def stop_after_first_batch(count):
    raise Interrupt()
  first = make_harness(tiny, "coco", root, path, **settings)
  with pytest.raises(Interrupt):
    first.run(2, stop_after_first_batch)
  assert len(first.store.of(2)) == 2
  with open(path, "a") as f:
    f.write('{"id": "7", "shots": 2, "outp')                # a kill in the middle of a write
  second = make_harness(tiny, "coco", root, path, **settings)
  assert sorted(r["id"] for r in second.store.of(2)) == sorted(r["id"] for r in first.store.of(2))
  assert second.pending(2) == [2, 3, 4]
  second.run(2)
  with open(path) as f:
    stored = [json.loads(line) for line in f]                 # every line whole again
  assert sorted(r["id"] for r in stored) == ["4", "5", "6", "7", "8"]
  straight = make_harness(tiny, "coco", root, str(tmp_path / "straight.jsonl"), **settings)
  straight.run(2)
  key = lambda rows: sorted((r["id"], r["output"], r["prompt"]) for r in rows)
  assert key(stored) == key(straight.store.of(2))
  result = second.result(2)
  assert result["queries"] == 5 and result["complete"] and result["metric"] == "cider"
  # The support subset: 3 of the 4 training images, fixed whatever the seed.
  assert len(second.support) == 3
  # Zero-shot open-ended: two text-only examples, then the query's image.
  prompt = second.prompt_of(0, 0)
  assert prompt.text.count("<image>") == 1 and prompt.text.endswith("<EOC><image>Output:")
  assert prompt.text.count("<EOC>") == 2 and len(prompt.media) == 1


@pytest.mark.slow
def test_a_query_whose_image_does_not_open_is_a_counted_skip(tiny, tmp_path):
  synthetic.write_attribute_task(str(tmp_path / "t"), seed=0, attribute="shape", support=4,
                                 queries=3, size=64)
  harness = make_harness(tiny, "attributes", str(tmp_path / "t"), str(tmp_path / "p.jsonl"))
  with open(harness.queries[1].media, "wb") as f:
    f.write(b"not an image")
  harness.run(1)
  result = harness.result(1)
  assert result["queries"] == 2 and result["skipped"] == {"unreadable_image": 1}
  assert result["complete"] and not harness.pending(1)         # the skip is not retried


@pytest.mark.slow
def test_video_questions_generate_from_clips_on_a_mesh_as_on_one_device(tiny, tmp_path):
  root = tmp_path / "msvd"
  (root / "videos").mkdir(parents=True)
  rows = {"train": [], "test": []}
  rng = np.random.default_rng(0)
  for k in range(5):
    clip, text = synthetic.clip(rng, 6, 64)
    np.save(root / "videos" / f"vid{k}.npy", clip)
    rows["train" if k < 3 else "test"].append(
        {"answer": text.split()[-1], "id": k, "question": "where is it moving?", "video_id": k})
  for split, items in rows.items():
    with open(root / f"{split}_qa.json", "w") as f:
      json.dump(items, f)
  settings = dict(frames=4, beam=3, max_new_tokens=3, batch_size=2)
  one = make_harness(tiny, "msvd_qa", str(root), str(tmp_path / "a.jsonl"), **settings)
  sharded = make_harness(tiny, "msvd_qa", str(root), str(tmp_path / "b.jsonl"),
                         mesh="data=8,model=1", **settings)
  for harness in (one, sharded):
    harness.run(1)
  assert one._load(one.queries[0].media).shape == (4, 64, 64, 3)  # pylint: disable=protected-access
  assert [(r["id"], r["output"]) for r in one.store.of(1)] == \
      [(r["id"], r["output"]) for r in sharded.store.of(1)]
  assert one.result(1)["metric"] == "top1" and one.result(1)["queries"] == 2


def test_metrics_of_stored_rows_by_hand():
  memes = tasks.get("hateful_memes")
  rows = [{"positive_probability": p, "reference": [label]}
          for p, label in ((0.9, "yes"), (0.4, "no"), (0.6, "yes"), (0.6, "no"))]
  # Positives 0.9, 0.6 vs negatives 0.4, 0.6: pairs won 1 + 1 + 1 + 0.5 of 4.
  assert harness_lib.score_rows(memes, rows, ("yes", "no")) == pytest.approx(100 * 3.5 / 4)
  video_qa = tasks.get("msvd_qa")
  rows = [{"output": " Dog.", "reference": ["dog"]}, {"output": "a dog", "reference": ["dog"]}]
  assert harness_lib.score_rows(video_qa, rows, ()) == 50.0
  vqa = tasks.get("vqav2")
  # "two" normalises to "2" (the answers disagree); 3 of 10 say "2": leaving one of them out
  # leaves 2 matches (2/3), leaving another out leaves 3 (1): (3 * 2/3 + 7) / 10.
  rows = [{"output": "two", "reference": ["2"] * 3 + ["3"] * 7}]
  assert harness_lib.score_rows(vqa, rows, ()) == pytest.approx(90.0)
  table = harness_lib.markdown_table([{"task": "vqav2", "shots": 4, "metric": "vqa",
                                       "value": 51.25, "queries": 10, "skipped": {"x": 2}}])
  assert table.splitlines()[-1] == "| vqav2 | 4 | vqa | 51.25 | 10 | 2 |"


def run_module(module, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=REPO,
                        capture_output=True, text=True)


@pytest.mark.slow
def test_evaluate_command_writes_results_resumes_and_refuses_other_settings(tiny, tmp_path):
  from flamingo_jax import weights  # pylint: disable=g-import-not-at-top
  config, params, _ = tiny
  weights.save_params(str(tmp_path / "params"), params)
  synthetic.write_naming_task(str(tmp_path / "naming"), seed=2, support=6, queries=5, size=64)
  common = [f"--config={config_path('tiny')}", f"--params={tmp_path / 'params'}",
            "--task=naming", f"--data_dir={tmp_path / 'naming'}", f"--output={tmp_path / 'out'}",
            "--batch_size=4"]
  first = run_module("flamingo_jax.evaluate", *common, "--shots=0,2")
  assert first.returncode == 0, first.stderr[-3000:]
  with open(tmp_path / "out" / "results.json") as f:
    results = json.load(f)
  assert [(r["task"], r["shots"], r["metric"], r["queries"]) for r in results] == \
      [("naming", 0, "top1", 5), ("naming", 2, "top1", 5)]
  assert all(r["settings"]["queries_per_second"] > 0 for r in results)
  assert first.stdout.splitlines()[0] == "| task | shots | metric | value | queries | skipped |"
  with open(tmp_path / "out" / "predictions.jsonl") as f:
    assert len(f.readlines()) == 10
  again = run_module("flamingo_jax.evaluate", *common, "--shots=0,2,4")    # only 4 is new
  assert again.returncode == 0, again.stderr[-3000:]
  with open(tmp_path / "out" / "predictions.jsonl") as f:
    assert len(f.readlines()) == 15
  with open(tmp_path / "out" / "results.json") as f:
    assert json.load(f)[:2] == results
  other = run_module("flamingo_jax.evaluate", *common, "--shots=2", "--seed=1")
  assert other.returncode == 1
  assert "holds an evaluation with other settings (seed: 0 -> 1); use another --output" in \
      other.stderr
  unknown = run_module("flamingo_jax.evaluate", *common[:2], "--task=vqa3",
                       f"--data_dir={tmp_path}", f"--output={tmp_path / 'o2'}")
  assert unknown.returncode == 1
  assert "unknown task 'vqa3'; known: attributes, coco" in unknown.stderr
  listed = run_module("flamingo_jax.evaluate", "--list_tasks")      # needs no --config
  assert listed.returncode == 0 and "naming          image  score     top1" in listed.stdout
  too_many = run_module("flamingo_jax.evaluate", *common[:5], f"--output={tmp_path / 'o3'}",
                        "--shots=8")
  assert too_many.returncode == 1
  assert "8 shots asked for but the support set holds 6 examples" in too_many.stderr
  missing = run_module("flamingo_jax.evaluate", *common[:3], f"--data_dir={tmp_path}",
                       f"--output={tmp_path / 'o4'}")
  assert missing.returncode == 1 and "naming.json is missing" in missing.stderr


def test_fewshot_demo_report_averages_seeds_and_draws_chance(tmp_path):
  from flamingo_jax.evaluation import report  # pylint: disable=g-import-not-at-top
  paths = []
  for seed, values in enumerate(((30.0, 60.0), (36.0, 70.0), (33.0, 80.0))):
    paths.append(str(tmp_path / f"r{seed}.json"))
    with open(paths[-1], "w") as f:
      json.dump([{"task": "naming", "shots": k, "value": v, "complete": True}
                 for k, v in zip((0, 8), values)], f)
  summary = report.summarize(paths)
  assert summary[0]["mean"] == pytest.approx(33.0) and summary[8]["mean"] == pytest.approx(70.0)
  assert summary[8]["std"] == pytest.approx(np.std([60.0, 70.0, 80.0]))
  assert summary[8]["min"] == 60.0 and summary[8]["seeds"] == 3
  assert "| 8 | 70.0 | 8.2 | 60.0 | 80.0 | 3 |" in report.table(summary, 100 / 3)
  report.plot(summary, 100 / 3, str(tmp_path / "plot.png"))
  assert Image.open(tmp_path / "plot.png").size[0] > 100
  with open(paths[0], "w") as f:
    json.dump([{"task": "naming", "shots": 0, "value": 30.0, "complete": False}], f)
  with pytest.raises(ValueError, match="0 shots is incomplete"):
    report.summarize(paths)


def _free_port() -> int:
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _evaluate(args, processes: int, devices: int):
  """`evaluate` in `processes` processes of `devices` CPU devices each (gloo); returns each
  process's CompletedProcess."""
  from train_helpers import env  # pylint: disable=g-import-not-at-top
  port = _free_port()
  extra = lambda i: ([f"--coordinator_address=127.0.0.1:{port}",
                      f"--num_processes={processes}", f"--process_id={i}"]
                     if processes > 1 else [])
  procs = [subprocess.Popen([sys.executable, "-m", "flamingo_jax.evaluate", *args, *extra(i)],
                            env=env(devices), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(processes)]
  outputs = [p.communicate(timeout=900) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  return outputs


@pytest.mark.slow
@pytest.mark.parametrize("task", ["naming", "coco"])
def test_two_processes_evaluate_as_one_and_resume(tiny, tmp_path, task):
  """2 processes x 2 devices (gloo, data 2 x model 2) write the results.json and
  predictions.jsonl that 1 process of 4 devices writes, for a score task (naming) and a
  generation task (coco, CIDEr); the 2-process run is done in two commands, the second
  resuming it with one more shot count."""
  from flamingo_jax import weights  # pylint: disable=g-import-not-at-top
  config, params, _ = tiny
  weights.save_params(str(tmp_path / "params"), params)
  if task == "naming":
    data = str(tmp_path / "naming")
    synthetic.write_naming_task(data, seed=2, support=6, queries=5, size=64)
  else:
    data = write_captions(str(tmp_path / "coco"), train=4, test=5)
  common = [f"--config={config_path('tiny')}", f"--params={tmp_path / 'params'}",
            f"--task={task}", f"--data_dir={data}", "--batch_size=2", "--max_new_tokens=4",
            "--mesh=data=2,model=2"]
  _evaluate([*common, f"--output={tmp_path / 'one'}", "--shots=0,2"], processes=1, devices=4)
  first = _evaluate([*common, f"--output={tmp_path / 'two'}", "--shots=0"], processes=2,
                    devices=2)
  assert "| task | shots |" in first[0][0] and "| task" not in first[1][0]   # process 0 writes
  _evaluate([*common, f"--output={tmp_path / 'two'}", "--shots=0,2"], processes=2, devices=2)

  def read(name):
    with open(tmp_path / name / "results.json") as f:
      results = json.load(f)
    with open(tmp_path / name / "predictions.jsonl") as f:
      rows = sorted((json.loads(line) for line in f), key=lambda r: (r["shots"], r["id"]))
    return results, rows
  (results_one, rows_one), (results_two, rows_two) = read("one"), read("two")
  assert [(r["shots"], r["queries"], r["complete"]) for r in results_two] == [(0, 5, True),
                                                                              (2, 5, True)]
  assert len(rows_two) == 10
  for x, y in zip(rows_one, rows_two):
    assert {k: v for k, v in x.items() if k != "scores"} == \
        {k: v for k, v in y.items() if k != "scores"}
    if "scores" in x:
      np.testing.assert_allclose(list(x["scores"].values()), list(y["scores"].values()),
                                 rtol=1e-5, atol=1e-5)
  assert [(r["shots"], r["metric"], r["queries"]) for r in results_one] == \
      [(r["shots"], r["metric"], r["queries"]) for r in results_two]
  np.testing.assert_allclose([r["value"] for r in results_one],
                             [r["value"] for r in results_two], rtol=0, atol=1e-9)
