"""Shared fixtures."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models: one thread is fastest, and fair on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    """A prepared data dir from the built-in corpus with a 512-token tokenizer (shared by the session)."""
    from velocis.data import default_corpus, prepare_dataset
    from velocis.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("tiny_data")
    zh, en = default_corpus.write_default_corpus(root / "corpus")
    tok = Tokenizer.train([str(zh), str(en)], vocab_size=512, progress=False)
    tok.save(root / "tok")
    return prepare_dataset([str(zh)], [str(en)], root / "tok", root / "data")
