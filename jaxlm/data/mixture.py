"""Mixtures of pretraining sources: several document sources drawn from with weights.

`config.data.mixture` is a tuple of dicts, each one source: the `config.data` fields it changes
(`source`, `files`, `text_glob`, ...), its `weight` and an optional `name`:

  --config.data.mixture="({'source': 'parquet', 'files': 'web/*.parquet', 'weight': 0.7},
                          {'source': 'jsonl', 'files': 'code/*.jsonl.zst', 'weight': 0.3})"

For training, every source is sharded, shuffled and repeated on its own, then Grain's
deterministic `MapDataset.mix` interleaves them in proportion to the weights: the realised
proportions are the weights up to rounding, and a resumed run continues from the exact position.
Validation is every source's validation documents, one source after another.
"""

import dataclasses

import grain

from jaxlm.errors import UserError


@dataclasses.dataclass(frozen=True)
class Component:
  name: str
  weight: float
  documents: grain.MapDataset


class Mixture:
  """The training documents of a mixture. As a sequence (for training a tokenizer) it is the
  sources interleaved by weight, unshuffled, as long as the scarcest source allows."""

  def __init__(self, components: list[Component]):
    self.components = components
    self._interleaved = grain.MapDataset.mix([c.documents for c in components], self.weights)

  @property
  def names(self) -> list[str]:
    return [c.name for c in self.components]

  @property
  def weights(self) -> list[float]:
    return [c.weight for c in self.components]

  def __len__(self) -> int:
    return len(self._interleaved)

  def __getitem__(self, index):
    return self._interleaved[index]


def source_names(documents) -> tuple[str, ...]:
  """The names of a mixture's sources; none for a single source."""
  return tuple(documents.names) if isinstance(documents, Mixture) else ()


def entries(data_config) -> list[tuple[str, float, dict]]:
  """(name, weight, the data fields it sets) of every source, checked."""
  result = []
  for index, entry in enumerate(data_config.mixture):
    where = f'config.data.mixture[{index}]'
    if not hasattr(entry, 'items'):
      raise UserError(f'{where} must be a dict of data fields with a "weight", got {entry!r}')
    fields = dict(entry)
    weight = fields.pop('weight', None)
    name = str(fields.pop('name', '') or f'{index}_{fields.get("source", data_config.source)}')
    if not isinstance(weight, (int, float)) or not weight > 0:
      raise UserError(f'{where}.weight must be a positive number, got {weight!r}')
    unknown = sorted(field for field in fields if field == 'mixture' or field not in data_config)
    if unknown:
      raise UserError(f'{where} sets {unknown[0]!r}, which is not a config.data field')
    if fields.get('source', data_config.source) == 'tokens':
      raise UserError(f"{where}: a mixture draws from documents; source 'tokens' is not "
                      'supported in one')
    result.append((name, float(weight), fields))
  names = [name for name, _, _ in result]
  if len(set(names)) < len(names):
    raise UserError(f'config.data.mixture: two sources share a name ({names})')
  return result


def sources(data_config, data_dir: str, single_source_documents):
  """(Mixture of training documents, validation documents) of `data_config.mixture`;
  `single_source_documents(data_config, data_dir)` gives one source's (train, validation)."""
  components, validations = [], []
  for name, weight, fields in entries(data_config):
    source_config = data_config.copy_and_resolve_references()
    with source_config.unlocked():
      source_config.mixture = ()
      source_config.update(fields)
    train, validation = single_source_documents(source_config, data_dir)
    components.append(Component(name, weight, train))
    validations.append(validation)
  return Mixture(components), grain.MapDataset.concatenate(validations)


def map_sources(documents, transform):
  """`transform` applied to the documents, or to each source of a mixture."""
  if not isinstance(documents, Mixture):
    return transform(documents)
  return Mixture([dataclasses.replace(c, documents=transform(c.documents))
                  for c in documents.components])


def document_order(documents, seed: int, shuffle: bool, repeat: bool, shard_index: int,
                   num_shards: int) -> grain.MapDataset:
  """The documents of shard `shard_index` in the order training reads them; a mixture's come as
  (source index, document) pairs."""
  if not isinstance(documents, Mixture):
    ds = documents[shard_index::num_shards]
    if shuffle:
      ds = ds.shuffle(seed=seed)  # reshuffled every epoch
    return ds.repeat(None) if repeat else ds
  parts = [document_order(c.documents, seed + index, shuffle, repeat, shard_index, num_shards)
           .map(lambda doc, index=index: (index, doc))
           for index, c in enumerate(documents.components)]
  # Without repeating, the weights would end the mixture at the scarcest source.
  return grain.MapDataset.mix(parts, documents.weights) if repeat else (
      grain.MapDataset.concatenate(parts))
