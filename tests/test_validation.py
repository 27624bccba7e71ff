"""Bad config values fail before any work, with one line naming the key, the value and what is allowed."""

import pytest

from conftest import REPO, train, train_py


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["optimizer.lr=-0.1"], "optimizer.lr=-0.1 is not valid: allowed is a number > 0"),
        (["optimizer.lr=0"], "optimizer.lr=0 is not valid: allowed is a number > 0"),
        (["model=mlp", "model.hidden=[4,0]"], "model.hidden[1]=0 is not valid: allowed is an integer >= 1"),
        (["dataset=sum_x1_x2", "dataset.size=0"], "dataset.size=0 is not valid: allowed is an integer >= 1"),
        (["dataset=points", "dataset.x=[]", "dataset.y=[]"],
         "dataset.x=[] is not valid: allowed is at least one point"),
        (["model=linear", "model.in_features=3"],
         "model.in_features=3 is not valid: allowed is 2 (the dataset's input size) or null"),
        (["dataset=points", "dataset.x=[1,2]", "dataset.y=[1,2,3]"],
         "dataset.y=[1, 2, 3] is not valid: allowed is as many points as dataset.x (2)"),
        (["loss=bce_with_logits", "dataset=points", "dataset.x=[1,2]", "dataset.y=[0,2]"],
         "dataset.y=[2.0] is not valid: allowed is targets in [0, 1] for BCEWithLogitsLoss"),
        (["model=linear", "+model.init={0.kernel:1.0}"],
         "model.init.0.kernel=1.0 is not valid: allowed is a parameter of the model: 0.weight, 0.bias"),
        (["model=linear", "model.init={0.weight:[[1.0,2.0,3.0]]}"],
         "model.init.0.weight=[[1.0, 2.0, 3.0]] is not valid: allowed is a number or a nested list of shape [1, 2]"),
        (["model.activation=swish"], "model.activation=swish is not valid: allowed is one of relu, leaky_relu"),
        (["telemetry.on_nonfinite=ignore"], "telemetry.on_nonfinite=ignore is not valid: allowed is one of warn, stop"),
        (["ckpt_path=/nonexistent.ckpt"], "ckpt_path=/nonexistent.ckpt is not valid: allowed is null, `last`"),
        ([f"ckpt_path={REPO / 'README.md'}"], f"ckpt_path={REPO / 'README.md'} is not valid: allowed is a checkpoint"),
        (["model.hidden=8"], "model.hidden=8 is not valid: allowed is a list of integers >= 1"),
        (["loss=bce_with_logits"], "loss=BCEWithLogitsLoss is not valid: allowed is a loss for targets outside [0, 1]"),
        (["trainer.precision=bogus"], "the config cannot be built: calling lightning.pytorch.trainer.trainer.Trainer: "
                                      "ValueError: Precision 'bogus' is invalid"),
        (["loss._target_=torch.nn.NoSuchLoss"], "the config cannot be built: calling torch.nn.NoSuchLoss"),
        (["+trainer.accumulate_grad_batches=2"], "trainer.accumulate_grad_batches=2 is not valid: allowed is 1"),
    ],
)
def test_bad_value_stops_before_training_with_one_line(run_dir, capsys, overrides, expected):
    with pytest.raises(SystemExit) as exit_info:
        train(overrides, run_dir)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"gradwatch: {expected}"), err
    assert "\n" not in err
    assert not (run_dir / "tb").exists() and not (run_dir / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["model=mlpp"], "gradwatch: model=mlpp is not valid: allowed is one of linear, mlp"),
        (["-m", "optimizer=sgd,rmsprop2"],
         "gradwatch: optimizer=rmsprop2 is not valid: allowed is one of adam, adamw, sgd"),
        (["optimizer.lr=-1"], "gradwatch: optimizer.lr=-1 is not valid: allowed is a number > 0"),
        (["hydra.run.dir=/dev/null/run"], "gradwatch: hydra.run.dir=/dev/null/run is not valid: allowed is a folder "
                                           "that can be created and written (/dev/null is not a writable folder)"),
    ],
)
def test_train_py_prints_one_line_and_no_traceback(tmp_path, args, expected):
    result = train_py(args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [expected], result.stderr
    assert "Traceback" not in result.stdout + result.stderr
