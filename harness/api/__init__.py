"""Everything a plugin imports: the hook marker, the types, the errors and the helpers.

The hooks themselves, and what each factory receives and returns, are in ``harness.hookspecs``;
``docs/plugins.md`` repeats them. Nothing outside ``harness`` and ``harness.api`` is part of the
plugin contract.

- registration: ``hookimpl``, ``Register``, ``OpenDomains``, ``Option``, ``NAME_RULE``, ``TASKS``
- datasets: ``DomainData``, ``Split``, ``ImageFiles``, ``IGNORE_INDEX``, ``fingerprint_tensors``,
  ``stratified_split``, ``random_split``
- backbones and heads: ``Backbone``, ``stages_from_prefixes``, ``load_weights_file``,
  ``ImageHead``, ``FeatureMapHead``, ``TransferModel``
- strategies: ``Strategy``, ``Batch``, ``StepContext``, ``LRScaled``, ``reverse_gradient``
- selection rules: ``Validator``, ``VALIDATOR_INPUTS`` (the menu a validator reads from)
- metrics: ``Metric``
- errors: ``HarnessError`` and the ones a plugin raises (``DatasetError``, ``WeightsError``,
  ``PluginContractError``, ``NonFiniteLossError``), and ``OptionError`` (an option refused)
"""

from harness.api.data import (
    IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DomainData,
    ImageFiles,
    Split,
    Task,
    fingerprint_tensors,
    random_split,
    stratified_split,
)
from harness.api.metric import Metric
from harness.api.models import (
    Backbone,
    FeatureMapHead,
    ImageHead,
    TransferModel,
    load_weights_file,
    stages_from_prefixes,
    takes_images,
)
from harness.api.strategy import Batch, LRScaled, StepContext, Strategy, reverse_gradient
from harness.api.validation import INPUTS as VALIDATOR_INPUTS
from harness.api.validation import Validator
from harness.errors import (
    DataNotFoundError,
    DatasetError,
    HarnessError,
    NonFiniteLossError,
    PluginContractError,
    WeightsError,
)
from harness.hookspecs import NAME_RULE, TASKS, OpenDomains, Register, hookimpl
from harness.options import Option, OptionError

__all__ = [
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NAME_RULE",
    "TASKS",
    "VALIDATOR_INPUTS",
    "Backbone",
    "Batch",
    "DataNotFoundError",
    "DatasetError",
    "DomainData",
    "ImageFiles",
    "FeatureMapHead",
    "HarnessError",
    "ImageHead",
    "LRScaled",
    "NonFiniteLossError",
    "OpenDomains",
    "Option",
    "OptionError",
    "PluginContractError",
    "Register",
    "Split",
    "StepContext",
    "Strategy",
    "Validator",
    "Metric",
    "Task",
    "TransferModel",
    "WeightsError",
    "fingerprint_tensors",
    "hookimpl",
    "load_weights_file",
    "random_split",
    "reverse_gradient",
    "stages_from_prefixes",
    "stratified_split",
    "takes_images",
]
