"""Which support examples go into a query's prompt (docs/paper.md §6): random or RICES.

    picks = random_shots(seed, query_index, support_size=2048, shots=4)
    picks = rices_shots(query_features, support_features, shots=4)   # [Q, 4]

Both return support indices in prompt order. Random picks depend only on (seed, query
index), so a query gets the same shots whichever process or device evaluates it. RICES
ranks the support set by cosine similarity of frozen vision features and orders the chosen
ones from least to most similar: the most similar example sits directly before the query.
"""

import numpy as np


def _check(support_size: int, shots: int) -> None:
  if shots > support_size:
    raise ValueError(f"{shots} shots asked for but the support set holds {support_size} examples")
  if shots < 0:
    raise ValueError(f"shots is {shots}")


def random_shots(seed: int, query_index: int, support_size: int, shots: int) -> np.ndarray:
  """`shots` distinct support indices drawn from (seed, query_index), in prompt order."""
  _check(support_size, shots)
  return np.random.default_rng([seed, query_index]).choice(support_size, shots, replace=False)


def rices_shots(query_features: np.ndarray, support_features: np.ndarray,
                shots: int) -> np.ndarray:
  """[Q, D], [S, D] -> int [Q, shots]: the most similar support examples (cosine), least
  similar first. Equal similarities rank the lower index as more similar."""
  query_features = np.asarray(query_features, np.float64)
  support_features = np.asarray(support_features, np.float64)
  if query_features.ndim != 2 or support_features.ndim != 2 or \
      query_features.shape[1] != support_features.shape[1]:
    raise ValueError(f"features [Q, D] and [S, D] expected, got {query_features.shape} and "
                     f"{support_features.shape}")
  _check(len(support_features), shots)

  def unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  similarity = unit(query_features) @ unit(support_features).T                 # [Q, S]
  # Stable sort on -similarity: most similar first, ties by index; then reversed.
  ranked = np.argsort(-similarity, axis=-1, kind="stable")[:, :shots]
  return ranked[:, ::-1]
