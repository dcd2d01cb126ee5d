"""Shared fixtures: tiny random models, a tokenizer, model directories on disk (see tiny_models)."""

from __future__ import annotations

import os

import pytest
import torch

from offload_engine.models import ModelAdapter
from tiny_models import ARCHS, tiny_model, tiny_tokenizer


@pytest.fixture(params=list(ARCHS))
def arch(request) -> str:
    return request.param


@pytest.fixture
def llama_adapter() -> ModelAdapter:
    return ModelAdapter(tiny_model("llama"), tiny_tokenizer())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A tiny Llama saved with its tokenizer, as a user's local model directory."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", eos_token_id=tokenizer.eos_token_id)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread_for_the_suite():
    """Every test on one torch thread: tiny models gain nothing from more, and on a busy 2-core
    machine two threads per test made the suite several times slower (72 s -> 2.4 s for one file).
    ``OMP_NUM_THREADS=1`` too, so that ``tbrun`` invoked in a test (its callback sets the threads)
    and the processes tests start keep to one thread."""
    threads, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = env


@pytest.fixture
def one_thread():
    """Tiny models run faster on one torch thread, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
