"""Every config composes to what its name promises and instantiates; every method on every backbone family trains
exactly its own parameters; config-level options (precision, callbacks, sweeps, run folders) do what they say."""

import math

import hydra
import lightning.pytorch as pl
import pytest
import torch
from helpers.configs import CONF_DIR as CONF
from helpers.configs import config_names
from omegaconf import OmegaConf

from dgss.config import build_method, instantiate_group
from dgss.errors import ConfigError
from dgss.methods.base import SegmentationMethod
from dgss.train import train

FAST = [
    "trainer.max_steps=1",
    "trainer.val_check_interval=1",
    "synthetic.val_length=2",
    "callbacks=minimal",
    "~logger",
]


@pytest.mark.parametrize("backbone", config_names("backbone"))
def test_every_backbone_config_builds_tiny(compose_cfg, backbone):
    cfg = compose_cfg([f"backbone={backbone}", "debug=tiny"])
    m = build_method(cfg)
    assert isinstance(m, SegmentationMethod)
    assert m.backbone.num_blocks == 4 and m.backbone.embed_dim in (64, 96)


@pytest.mark.parametrize("backbone", [b for b in config_names("backbone") if b != "toy"])
def test_real_backbone_configs_name_a_local_weights_file(compose_cfg, backbone):
    cfg = compose_cfg([f"backbone={backbone}"])
    assert cfg.backbone.weights.endswith(f"/{cfg.backbone.name}.safetensors")
    assert cfg.backbone.weights.startswith(str(cfg.paths.weights_dir))


@pytest.mark.parametrize("data", config_names("data"))
def test_every_data_config_instantiates(compose_cfg, tmp_path, data):
    from helpers.real_data import write_all_fixtures

    write_all_fixtures(tmp_path / "data")  # real data sets: fixtures in their on-disk layouts
    extra = []
    if data == "folder":  # your own data: a folder of its own (tests/test_folder_data.py)
        from helpers.folder_data import make_folder

        extra = [f"folder.root={make_folder(tmp_path / 'mine', n_train=2, n_val=1)}"]
    cfg = compose_cfg([f"data={data}", f"paths.data_dir={tmp_path / 'data'}", *extra])
    dm = hydra.utils.instantiate(cfg.data)
    assert dm.num_classes == cfg.data.num_classes and dm.target_names
    for name, ds in dm.targets.items():
        sample = dm.eval_samples[name][0]  # what the evaluation loader hands out: uint8, the model normalises
        assert sample["image"].dtype == torch.uint8 and sample["label"].ndim == 2, name
        if data == "gta2cbm":
            assert (
                ds.test_size
                == {"cityscapes": (1024, 512), "bdd100k": (1280, 720), "mapillary": (1024, 512)}[name]
            )


def test_default_groups_instantiate(compose_cfg):
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    from dgss.callbacks import IoUTables, SkippedSamples, StepProgressBar, WandbMedia
    from dgss.checkpoint import StepCheckpoint
    from dgss.preemption import Preemption

    cfg = compose_cfg(["logger=many", "trainer=cpu"])
    callbacks = instantiate_group(cfg.callbacks)
    assert sorted(type(c).__name__ for c in callbacks) == sorted(
        t.__name__ for t in (ModelCheckpoint, StepCheckpoint, Preemption, IoUTables, SkippedSamples, WandbMedia,
                             LearningRateMonitor, StepProgressBar))  # fmt: skip
    best = next(c for c in callbacks if type(c) is ModelCheckpoint)
    assert (best.monitor, best.mode, best.save_top_k) == ("val/mean_mIoU", "max", 1)
    periodic = next(c for c in callbacks if isinstance(c, StepCheckpoint))
    assert periodic.save_last and periodic.dirpath == best.dirpath
    minimal = instantiate_group(compose_cfg(["callbacks=minimal"]).callbacks)
    assert {type(c) for c in minimal} == {IoUTables, SkippedSamples, StepProgressBar}
    assert {type(x).__name__ for x in instantiate_group(cfg.logger)} == {
        "CSVLogger",
        "WandbLogger",
        "TensorBoardLogger",
    }


# ------------------------------------------------------------------------------ every experiment config
SETTINGS = {  # folder -> (sources, targets in the mean): the DGSS protocols of the papers
    "gta2cbm": (["gta"], ["cityscapes", "bdd100k", "mapillary"]),
    "gtasyn2cbm": (["gta", "synthia"], ["cityscapes", "bdd100k", "mapillary"]),
    "gsu2cbm": (["gta", "synthia", "urbansyn"], ["cityscapes", "bdd100k", "mapillary"]),
    "cs2bm": (["cityscapes"], ["bdd100k", "mapillary"]),
    "cs2acdc": (["cityscapes"], ["fog", "night", "rain", "snow"]),
}
# every method: a config of the method group (each registered schema has one; test_every_registered_method_has_a_config)
METHODS = config_names("method")
BACKBONES = {"dinov2_l": "vit_large_patch14_dinov2.lvd142m", "eva02_l": "eva02_large_patch14_224.mim_m38m",
             "clip_l": "vit_large_patch14_clip_224.openai", "samvit_h": "samvit_huge_patch16.sa1b",
             "dinov3_l": "vit_large_patch16_dinov3.lvd1689m"}  # fmt: skip


@pytest.mark.parametrize("experiment", [e for e in config_names("experiment") if "/" in e])
def test_every_paper_experiment_composes_to_the_recipe_its_name_promises(compose_cfg, experiment):
    """``<setting>/<method>_<backbone>``: the composed config trains that method on that backbone from the local
    weights file, on the setting's sources, evaluated on its targets, with Mask2Former; ``debug=tiny`` shrinks it
    to a random-init CPU run of the same classes without touching the recipe's method options."""
    setting, name = experiment.split("/")
    method, backbone = name.rsplit("_", 2)[0], "_".join(name.rsplit("_", 2)[1:])
    cfg = compose_cfg([f"experiment={experiment}"])
    assert cfg.method._target_ == compose_cfg([f"method={method}"]).method._target_
    assert cfg.backbone.name == BACKBONES[backbone] and cfg.head._target_.endswith("Mask2FormerHead")
    assert cfg.backbone.weights == f"{cfg.paths.weights_dir}/{cfg.backbone.name}.safetensors"
    sources, targets = SETTINGS[setting]
    in_mean = [t for t in cfg.data.targets if t not in cfg.data.get("exclude_from_mean", [])]
    assert list(cfg.data.sources) == sources and in_mean == targets
    assert cfg.trainer.max_steps > 0 and cfg.method.inference.mode == "slide"
    tiny = compose_cfg([f"experiment={experiment}", "debug=tiny"])
    assert tiny.backbone.tiny and tiny.backbone.weights is None and tiny.trainer.accelerator == "cpu"
    assert tiny.backbone.name == cfg.backbone.name and tiny.method._target_ == cfg.method._target_
    keep = {"optimizer", "scheduler", "inference"}  # the shrink may touch only the warm-up and inference mode
    recipe, shrunk = (OmegaConf.to_container(c.method, resolve=False) for c in (cfg, tiny))  # as written
    assert {k: v for k, v in shrunk.items() if k not in keep} == {
        k: v for k, v in recipe.items() if k not in keep
    }


# ----------------------------------------------------------------- every method on every backbone family
FAMILIES = ["dinov2_l", "eva02_l", "clip_l", "samvit_h", "dinov3_l"]


@pytest.mark.parametrize("backbone", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_every_family_trains_exactly_its_own_parameters(compose_cfg, method, backbone):
    """Built as dgss-train builds it (tiny, random init): the pretrained backbone is frozen except under full
    fine-tuning, and only parameters the method adds train beside the head; one forward / backward on a uint8 batch
    gives a finite loss and gradients to exactly the trainable parameters (an unused trainable parameter would stall
    DDP); the optimizer's groups hold each trainable parameter once and nothing else."""
    head = (
        ["head=mask2former"] if method == "rein" else ["head=light"]
    )  # Rein links its tokens to the queries
    cfg = compose_cfg(
        [f"method={method}", f"backbone={backbone}", "debug=tiny", "backbone.weights=null", *head]
    )
    torch.manual_seed(0)
    m = build_method(cfg)
    pretrained = {n: p.numel() for n, p in hydra.utils.instantiate(cfg.backbone).model.named_parameters()}
    named = dict(m.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    frozen = {n for n, p in named.items() if not p.requires_grad}
    assert all(n in trainable for n in named if n.startswith("head."))
    if method == "full":
        assert not frozen
    else:
        assert all(n.startswith("backbone.model.") for n in frozen)
        # every pretrained tensor frozen; SoMA also trains the biases of the layers it adapts
        biases = [
            n for n in trainable if n.endswith((".base.bias", ".qkv.qkv.bias"))
        ]  # SoMA's wrapped layers
        assert bool(biases) == (method == "soma")
        assert sum(named[n].numel() for n in [*frozen, *biases]) == sum(pretrained.values())
        added = {n for n in trainable if not n.startswith("head.")}
        assert all(named[n].numel() > 0 for n in added)
        assert bool(added) == (
            not method.startswith(("frozen", "fishertune"))
        )  # FisherTune selects elements, not tensors
    gen = torch.Generator().manual_seed(0)
    batch = {"image": list(torch.randint(0, 256, (2, 3, 64, 128), dtype=torch.uint8, generator=gen)),
             "label": list(torch.randint(0, 19, (2, 64, 128), dtype=torch.uint8, generator=gen))}  # fmt: skip
    m.train()
    images, labels = m.prepare_batch(batch)
    loss = sum(m.head.loss(m(images), labels).values())
    assert torch.isfinite(loss)
    loss.backward()
    assert {n for n, p in named.items() if p.grad is not None} == trainable
    grouped = [n for g in m.param_groups() for n in g["names"]]
    assert sorted(grouped) == sorted(trainable)


@pytest.mark.parametrize("debug", config_names("debug"))
@pytest.mark.parametrize("trainer", config_names("trainer"))
def test_debug_and_trainer_configs_compose(compose_cfg, debug, trainer):
    cfg = compose_cfg([f"trainer={trainer}", f"debug={debug}"])
    assert OmegaConf.to_container(cfg.trainer, resolve=True)["use_distributed_sampler"] is False


def test_experiment_is_a_delta_and_command_line_wins(compose_cfg):
    cfg = compose_cfg(["experiment=full", "trainer=cpu", "method.optimizer.lr=3e-4"])
    assert cfg.trainer.accelerator == "cpu" and cfg.backbone.name.startswith("vit_large_patch14_dinov2")
    assert cfg.method.optimizer.lr == 3e-4 and cfg.method._target_.endswith("FullFineTune")
    frozen = compose_cfg(["experiment=frozen"])
    assert frozen.method._target_.endswith("FrozenBackbone")
    assert list(frozen.data.targets) == [
        "cityscapes",
        "bdd100k",
        "mapillary",
    ]  # the paper recipes: GTAV -> C/B/M


def test_optuna_and_slurm_configs_compose(compose_cfg):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = compose_cfg(["hparams_search=optuna"])
    assert cfg.hydra.sweeper.direction == "maximize" and cfg.optimized_metric == "val/mean_mIoU"
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = compose_cfg(["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=8", "trainer.num_nodes=2"])
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert (
        launcher["tasks_per_node"] == 8 and launcher["nodes"] == 2 and "SlurmLauncher" in launcher["_target_"]
    )


@pytest.mark.parametrize(
    "override, line",
    [("trainer.max_steps=abc", "trainer.max_steps='abc' must be int"),
     ("data.batch_size=2.5", "data.batch_size=2.5 must be int"),
     ("synthetic.height=true", "synthetic.height=True must be int"),
     ("head.chanels=64", "head.chanels is not an option (did you mean channels?); valid: _target_, _partial_, "
      "channels, dropout, upsample, loss_weight, ignore_index, tiny"),
     ("backbone.grad_checkpointing=sometimes", "backbone.grad_checkpointing='sometimes' must be bool"),
     ("data.train_pipeline.flipp=0.5", "data.train_pipeline.flipp is not an option (did you mean flip?); valid: "
      "_target_, crop, scales, short_edge, num_scales, max_long_edge, cat_max_ratio, flip, photometric, "
      "min_prefer_pixels, antialias"),
     # unions and Literal choices OmegaConf holds as Any: checked against the signature after composing
     ("trainer.val_check_interval=[1]", "trainer.val_check_interval=[1] must be int or float or str or a mapping "
      "or null"),
     ("trainer.precision=bf17-mixed", "trainer.precision='bf17-mixed' must be 64 or 32 or 16 or "
      "'transformer-engine' or 'transformer-engine-float16' or '16-true' or '16-mixed' or 'bf16-true' or "
      "'bf16-mixed' or '32-true' or '64-true' or '64' or '32' or '16' or 'bf16' or null"),
     ("backbone.out_indices=[1,x]", "backbone.out_indices=[1, 'x'] must be a list of int or null"),
     ("+backbone.foo=1", "backbone.foo is not an option of Backbone; valid: name, weights, out_indices, img_size, "
      "tiny, final_norm, grad_checkpointing, model_kwargs, mean, std")],
)  # fmt: skip
def test_backbone_head_data_and_trainer_options_are_typed_by_their_signatures(override, line):
    """The backbone, heads, data module (with its pipelines), the synthetic block and Lightning's Trainer are typed
    by schemas generated from their constructors' signatures (dgss.schemas): a misspelt key, a value of the wrong
    type, a union or Literal it does not fit, a key added with + is one line naming the key, before anything runs."""
    from dgss.cli import check_compose
    from dgss.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        check_compose("train", ["debug=tiny", override])
    assert str(e.value) == line


def test_a_config_file_holds_only_what_differs_from_python_defaults():
    """Every value a backbone, head, data or trainer YAML file sets differs from the default of the parameter it
    names (the schema generated from the constructor holds the defaults: one home each)."""
    import yaml

    from dgss.schemas import SIGNATURES, defaults_of

    groups = {"backbone": "dgss.models.backbone.Backbone", "trainer": "lightning.pytorch.Trainer"}
    restated = []
    for group in ("backbone", "head", "data", "trainer"):
        for path in sorted((CONF / group).glob("*.yaml")):
            doc = yaml.safe_load(path.read_text()) or {}
            node = doc.get("data", doc) if group == "data" else doc
            nodes = [(node, groups.get(group) or node.get("_target_"))]
            if group == "head":
                nodes = [(node, next(t for t in SIGNATURES if t.lower().endswith(path.stem + "head")))]
            if group == "data":
                nodes = [(node, "dgss.data.datamodule.DGSSDataModule")]
                nodes += [(node.get(p) or {}, f"dgss.data.transforms.{c}")
                          for p, c in (("train_pipeline", "TrainPipeline"), ("test_pipeline", "TestPipeline"))]  # fmt: skip
            for values, target in nodes:
                defaults = defaults_of(target)
                restated += [f"{path.name}: {k}" for k, v in values.items()
                             if k in defaults and not isinstance(v, dict) and v == defaults[k]]  # fmt: skip
    assert restated == []


@pytest.mark.parametrize(
    "overrides, line",
    [(["method.optimizer.lr=fast"], "method.optimizer.lr='fast' must be float"),
     (["method=rein", "method.rein.num_tokns=4"], "method.rein.num_tokns is not an option (did you mean num_tokens?); "
      "valid: num_tokens, lora_rank, query_dim, patch_size, scale_init, zero_mlp_delta_f, use_softmax, link_token_to_query"),
     (["method=rein", "method.rein.lora_rank=none"], "method.rein.lora_rank='none' must be int"),
     (["method=fishertune", "method.fishertune.selection.scope=perblock"],
      "method.fishertune.selection.scope='perblock' is not supported; choose one of ['global', 'per_block', 'per_tensor']"),
     (["method=cobot_lora", "method.cobot.head=quat"],
      "method.cobot.head='quat' is not supported; choose one of ['quaternion', 'linear', 'none']"),
     (["method=cobot_adaptformer", "method.peft.rank=3"],
      "method.peft.rank is not an option; valid: bottleneck, scale, dropout, norm, input, position"),
     (["method.inference.mode=sliding"], "method.inference.mode='sliding' is not supported; choose one of ['whole', 'slide']"),
     (["method.scheduler.warmup_step=5"], "method.scheduler.warmup_step is not an option (did you mean warmup_steps?); "
      "valid: warmup_steps, warmup_start_factor, power, weight_decay, weight_decay_min, weight_decay_zero")],
)  # fmt: skip
def test_method_options_are_typed_at_compose_time(overrides, line):
    """Every method option has one typed home (a dataclass registered as the method's Hydra schema): a misspelt
    key, a value of the wrong type or an unsupported choice is one line naming the key, before anything runs."""
    from dgss.cli import check_compose
    from dgss.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        check_compose("train", ["debug=tiny", *overrides])
    assert str(e.value) == line
    check_compose(
        "train", ["debug=tiny", "method=rein", "method.rein.lora_rank=null", "method.rein.num_tokens=7"]
    )
    check_compose("train", ["-m", "method=full,frozen"])  # multiruns are Hydra's to compose


class DtypeProbe(pl.Callback):
    """Records, for each training step, the dtype the first linear layer of the backbone computes in (a block's
    output is float32 either way: the residual stream adds in float32) and the dtypes of the parameters and of the
    optimizer's moments after the step."""

    seen: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        def hook(module, args, out):
            DtypeProbe.seen.append({"linear": out.dtype})

        linear = next(
            m for m in pl_module.backbone.model.blocks[0].modules() if isinstance(m, torch.nn.Linear)
        )
        self.handle = linear.register_forward_hook(hook)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.handle.remove()
        state = trainer.optimizers[0].state.values()
        DtypeProbe.seen[-1]["params"] = {p.dtype for p in pl_module.parameters()}
        DtypeProbe.seen[-1]["moments"] = {s["exp_avg"].dtype for s in state}


@pytest.mark.parametrize("precision, compute", [("bf16-mixed", torch.bfloat16), ("32-true", torch.float32)])
def test_bf16_mixed_is_a_trainer_option(compose_cfg, precision, compute):
    """``trainer.precision=bf16-mixed`` runs the forward under bf16 autocast while parameters and AdamW's moments
    stay float32 (mixed, not pure bf16); the default computes in float32."""
    DtypeProbe.seen.clear()
    cfg = compose_cfg(["debug=tiny", f"trainer.precision={precision}", "method=full", *FAST,
                       f"+callbacks.probe._target_={__name__}.DtypeProbe"])  # fmt: skip
    metrics = train(cfg)
    assert math.isfinite(metrics["train/loss"])
    assert DtypeProbe.seen and all(s["linear"] == compute for s in DtypeProbe.seen)
    assert all(s["params"] == {torch.float32} and s["moments"] == {torch.float32} for s in DtypeProbe.seen)


def test_the_demo_takes_another_method_and_stray_method_keys_are_named(compose_cfg):
    from dgss.cli import user_error

    m = build_method(
        compose_cfg(["experiment=demo", "method=rein", "debug=tiny"])
    )  # no FisherTune keys left over
    assert type(m).__name__ == "Rein"
    cfg = compose_cfg(["debug=tiny", "method=frozen", "+method.fishertune.schedule.delta_max=0.2"])
    with pytest.raises(Exception) as e:
        build_method(cfg)
    assert user_error(e.value) == (
        "method does not take the key 'fishertune' (set for another method by an experiment or override); "
        "drop it with ~method.fishertune"
    )


@pytest.mark.parametrize(
    "override, line",
    [
        ("method.schedule.delta_max=0.1", "method.schedule is now called method.fishertune.schedule"),
        ("+method.fisher.score=fim", "method.fisher is now called method.fishertune.fisher"),
        ("+method.foo=1", "method.foo is not an option of FisherTune; valid: _target_, num_classes"),
    ],
)
def test_fishertunes_options_moved_under_method_fishertune_and_the_old_names_say_where(override, line):
    """Issue 29: FisherTune's groups nest under ``method.fishertune`` like every method's (``method.rein``, ...),
    which ends the ``schedule`` / ``scheduler`` and ``optim`` / ``optimizer`` look-alikes; the old paths are refused
    in one line naming the new one, before anything runs."""
    from dgss.cli import check_compose

    with pytest.raises(ConfigError) as e:
        check_compose("train", ["experiment=demo", override])
    assert str(e.value).startswith(line)


def test_paper_recipes_follow_the_protocol(compose_cfg):
    grid = [f"gta2cbm/{m}_{b}" for m in ("full", "frozen", "rein", "fishertune", "lora", "adaptformer", "vpt",
                                         "cobot_lora", "cobot_adaptformer", "soma")
            for b in ("dinov2_l", "eva02_l", "clip_l", "samvit_h", "dinov3_l")]  # fmt: skip
    assert set(grid) <= set(config_names("experiment"))
    rein = compose_cfg(["experiment=rein"])
    assert rein.task_name == "rein" and rein.backbone.name == "vit_large_patch14_dinov2.lvd142m"
    assert rein.head._target_.endswith("Mask2FormerHead") and list(rein.data.targets) == [
        "cityscapes",
        "bdd100k",
        "mapillary",
    ]
    assert (rein.method.optimizer.lr, rein.method.optimizer.weight_decay, rein.trainer.max_steps) == (
        1e-4,
        0.05,
        40000,
    )
    assert rein.data.batch_size == 4 and rein.method.scheduler.warmup_steps == 0 and rein.seed == 42
    assert dict(rein.method.inference)["mode"] == "slide" and rein.method.inference.stride == 341
    assert compose_cfg(["experiment=gta2cbm/lora_dinov2_l"]).method.peft.rank == 8
    af = compose_cfg(["experiment=gta2cbm/adaptformer_dinov2_l"]).method.peft
    assert af.bottleneck == 64 and af.norm is False
    assert compose_cfg(["experiment=gta2cbm/rein_samvit_h"]).head.replace_query_feat is False
    acdc = compose_cfg(["experiment=cs2acdc/rein_dinov2_l"])
    assert acdc.method.optimizer.lr == 6e-5 and acdc.method.scheduler.warmup_steps == 10000
    assert acdc.data.train_pipeline.crop == [1024, 1024] and acdc.data.targets.fog.test_size == [1920, 1080]
    assert acdc.method.inference.crop == 1024 and acdc.method.inference.stride == 683
    assert list(compose_cfg(["experiment=gtasyn2cbm/fishertune_dinov2_l"]).data.sources) == ["gta", "synthia"]
    soma = compose_cfg(["experiment=gta2cbm/soma_dinov2_l"])  # SoMA's configs (spec soma.md §5)
    assert (soma.method.soma.rank, soma.method.soma.alpha, soma.method.scheduler.weight_decay) == (
        16,
        16.0,
        "cosine",
    )
    assert (soma.callbacks.ema.momentum, soma.callbacks.ema.begin) == (2e-4, 12000)
    assert compose_cfg(["experiment=gtasyn2cbm/soma_dinov2_l"]).callbacks.ema is None
    c2bm = compose_cfg(["experiment=cs2bm/soma_dinov2_l"])
    assert (
        c2bm.data.batch_size == 8
        and c2bm.method.scheduler.warmup_steps == 1500
        and c2bm.callbacks.ema.begin == 20000
    )
    s_acdc = compose_cfg(["experiment=cs2acdc/soma_dinov2_l"])
    assert s_acdc.method.optimizer.lr == 1e-4 and s_acdc.data.train_pipeline.crop == [1024, 1024]


@pytest.mark.parametrize("space", ["rein", "lora", "adaptformer", "vpt", "fishertune"])
def test_method_search_spaces_compose_with_their_method(compose_cfg, space):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    experiment = {"rein": "rein", "fishertune": "fishertune"}.get(space, f"gta2cbm/{space}_dinov2_l")
    cfg = compose_cfg([f"experiment={experiment}", f"hparams_search={space}"])
    params = dict(cfg.hydra.sweeper.params)
    assert "method.optimizer.lr" in params and len(params) == 3 + (space == "rein")
    assert cfg.hydra.sweeper.study_name == space
    for key in params:  # every searched key exists in the composed method
        assert OmegaConf.select(cfg, key) is not None, key


def test_ddp_inside_an_in_process_multirun_is_refused():
    from hydra.types import RunMode

    from dgss.config import check_launch
    from dgss.errors import ConfigError

    ddp = OmegaConf.create({"devices": 4, "num_nodes": 1})
    basic = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
    with pytest.raises(
        ConfigError, match=r"trainer.devices=4, trainer.num_nodes=1 inside an in-process multirun"
    ):
        check_launch(ddp, RunMode.MULTIRUN, basic)
    check_launch(ddp, RunMode.RUN, None)  # a single run: Lightning launches the ranks
    check_launch(
        ddp, RunMode.MULTIRUN, "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    )
    check_launch(OmegaConf.create({"devices": 1, "num_nodes": 1}), RunMode.MULTIRUN, basic)
    with pytest.raises(ConfigError):
        check_launch(OmegaConf.create({"devices": 1, "num_nodes": 2}), RunMode.MULTIRUN, basic)


def test_every_run_gets_its_own_folder_unless_run_name_pins_one(compose_cfg):
    """``${oc.select:run_name,...}`` returned the key's null: every run without run_name went to runs/None and
    overwrote the previous one. Now: date_time plus 6 random hex digits (runs started in the same second differ),
    stable within a run, and run_name pins the folder."""
    import re

    folders = set()
    for config in ("train", "train", "eval", "predict"):
        extra = {"train": [], "eval": ["ckpt_path=x"], "predict": ["ckpt_path=x", "input=y"]}[config]
        cfg = compose_cfg(extra, config_name=config)
        run, sweep = cfg.hydra.run.dir, cfg.hydra.sweep.dir
        name = run.rsplit("/", 1)[1]
        assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_[0-9a-f]{6}", name), run
        assert cfg.hydra.run.dir == run and sweep.endswith(f"/multiruns/{name}")  # one name per run
        folders.add(name)
    assert len(folders) == 4
    pinned = compose_cfg(["run_name=seed42"])
    assert pinned.hydra.run.dir.endswith("/train/runs/seed42") and pinned.hydra.sweep.dir.endswith(
        "/multiruns/seed42"
    )


@pytest.mark.parametrize("experiment", [e for e in config_names("experiment") if "/" in e])
def test_every_paper_experiment_shrinks_to_the_embedded_data(compose_cfg, experiment):
    """Issue 25 (8): `experiment=<x>/soma_* debug=tiny` failed ("dict is not a dgss data set"): the recipe's test
    sizes for its real targets landed on the synthetic data as targets without a data set. Every paper recipe's
    data builds under debug=tiny; such settings are dropped with a warning naming them."""
    cfg = compose_cfg([f"experiment={experiment}", "debug=tiny"])
    dm = hydra.utils.instantiate(cfg.data)
    assert set(dm.targets) == set(cfg.data.targets) - {
        n for n, t in cfg.data.targets.items() if "_target_" not in t
    } and all(type(t).__name__ == "SyntheticDomain" for t in dm.targets.values())


@pytest.mark.parametrize("experiment", ["demo", "gta2cbm/rein_dinov2_l", "cs2acdc/soma_dinov2_l"])
def test_the_training_crop_is_the_datas_linked_when_the_config_composes(compose_cfg, experiment):
    """Issue 29 (1): the model pads a training batch to ``method.input.crop``, which the config links to
    ``data.train_pipeline.crop`` (conf/method/_common.yaml) instead of the method reading the data module in setup."""
    cfg = compose_cfg(
        [f"experiment={experiment}", "data.train_pipeline.crop=[48,96]", "backbone.weights=null"]
    )
    assert list(cfg.method.input.crop) == [48, 96]
    with torch.device("meta"):
        method = build_method(cfg)
    assert method.input.crop == (48, 96)


def test_every_registered_method_has_a_config_and_every_config_a_registered_method(compose_cfg):
    """Issue 29: a method is its file and its YAML. Importing ``dgss.methods`` registers every module's schema (no
    hand-kept list); each registered method class has a config in the method group, and each config names one."""
    from dgss.options import SCHEMAS

    targets = {n: compose_cfg([f"method={n}"]).method._target_ for n in METHODS}
    assert set(targets.values()) == set(SCHEMAS)
