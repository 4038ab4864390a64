"""The `titans_corpora` tensorflow-datasets builder (configs `books` and `code`).

Importing this package registers the builder with tfds (it must live in a package: tfds looks up
the builder's module directory for its metadata files).
"""

from titans_jax.data.tfds_corpora.titans_corpora import TitansCorpora

__all__ = ["TitansCorpora"]
