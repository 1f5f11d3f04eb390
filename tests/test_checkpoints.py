"""The coordinator's PEFT adapter export refuses, in one line, a checkpoint whose classifier it cannot rebuild
(a sentence-transformers model, classified on its pooled embedding) instead of writing a wrong adapter."""

import numpy as np
import pytest

from ewtune.accountant.errors import InvalidInputError
from ewtune.coordinator.checkpoints import save_peft_adapter


def test_a_pooled_checkpoint_is_refused_by_the_adapter_export(tiny_pooled_dir, tmp_path):
    arrays = {"base_model.model.encoder.encoder.layer.0.attention.self.query.lora_A.default.weight": np.zeros((2, 32), np.float32)}
    with pytest.raises(InvalidInputError, match="sentence-transformers checkpoint"):
        save_peft_adapter(arrays, tiny_pooled_dir, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
