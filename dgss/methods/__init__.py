"""The methods. Importing this package registers every method's options as a Hydra schema (``<name>_schema`` in
the ``method`` group), which ``conf/method/<name>.yaml`` starts from."""

from dgss.methods import cobot, fishertune, frozen, full, peft, recyclelora, rein, soma  # noqa: F401  (registers the schemas)
