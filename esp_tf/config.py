"""The typed, nested configuration of an esp_tf run, owned by the library (no absl, no TensorFlow).

    RunConfig
      workdir, phases, seed, restart, verbose
      data: DataConfig        net: NetConfig          experts: ExpertsConfig
      condense: CondenseConfig                        scale: ScaleConfig
      method: the method's own Config (esp_tf/methods/<name>.py: ESPConfig, DMConfig, TMConfig)
      param: the parameterisation's own Config (esp_tf/synthetic.py: PixelsConfig, LatentsConfig)
      eval: EvalConfig        export: ExportConfig

Every field of the groups here is one setting with its one default, its help and what it is to
a run's identity; `python -m esp_tf.train` generates a flag of the same name from it (cli.py)
and `--help` lists them without importing TensorFlow. The method's and parameterisation's
settings have their defaults in their own Configs, beside their TensorFlow code; their flags
(`METHOD_FLAGS`, `PARAM_FLAGS`: name, type and help only, default None = the Config's) are
listed here so that --help needs no TensorFlow (tests/test_condense.py holds the two lists
equal to the registries' Config fields).

Identity (pipeline.identity_flags): a finished run resumes only under the same values of the
settings it uses: RUN (data, network, set size and init, schedule, seeds), EXPERTS (the expert
recipe, when the run reads experts), its method's and its parameterisation's settings. RERUN_SAFE
settings (scheduling, paths, logging, per-name exports) and EVALUATION settings (a change moves
the evaluation outputs aside, the condensation is kept) never refuse a run; NOT_RECORDED ones
(--restart, --verbose) are options of one invocation, not settings of the result.

Build one in Python (no absl): `RunConfig(data=DataConfig(dataset="cifar10"),
condense=CondenseConfig(ipc=10, param="latents"), param=LatentsConfig(num_decoders=8))`, then
`pipeline.run(config, workdir)`.
"""
from __future__ import annotations

import dataclasses

from esp_tf import choices
from esp_tf.cluster import STRATEGIES                  # cluster.make_strategy (TensorFlow-free)

RUN, EXPERTS, RERUN_SAFE, EVALUATION, NOT_RECORDED = "run", "experts", "rerun-safe", "evaluation", "not recorded"


def setting(default, identity: str, help: str, *, flag: str, choices: tuple = None):
    """A field of a config group: its default, its identity class, the help of its flag and the
    flag's type (str, int, float, bool, list: a tuple here, enum: one of `choices`)."""
    return dataclasses.field(default=default, metadata={"identity": identity, "help": help, "flag": flag,
                                                        "choices": choices})


@dataclasses.dataclass(frozen=True)
class FlagSpec:
    """A method or parameterisation setting's flag: default None (= the Config's default)."""
    name: str
    flag: str
    help: str
    choices: tuple = None
    identity: str = None         # besides the owner's: RERUN_SAFE for a setting that may change
    before_added: str = None     # what runs recorded before the flag existed, if not its default


def flag_spec(name: str, flag: str, help: str, *, choices=None, identity=None, before_added=None) -> FlagSpec:
    return FlagSpec(name, flag, help, choices, identity, before_added)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The real data: which dataset, how it is read and split."""
    dataset: str = setting('fashion_mnist_mini', RUN,
        ('TFDS dataset name (embedded default needs no download), or folder:<dir> for your own '
         "images (one subfolder per class; README 'Your own images')."), flag='str')
    data_dir: str | None = setting(None, RERUN_SAFE,
        ("TFDS data_dir holding prepared datasets (default: TFDS's own; esp_tf.evaluate: the "
         "condensed set's workdir's, else TFDS's own)."), flag='str')
    image_size: int = setting(0, RUN,
        ('--dataset=folder:<dir> only: resize every image to this many pixels square (0: keep '
         "the images' own size, which they must then share)."), flag='int')
    download: bool = setting(True, RERUN_SAFE,
        ('Download and prepare a missing dataset through TFDS, as tfds.load does (needs '
         'network); --nodownload: only read prepared data (tests, benchmarks).'), flag='bool')
    val_per_class: int = setting(0, RUN,
        ('Hold out this many training images per class as a validation split (class-balanced, '
         'fixed seed): experts and condensation never see them, and evaluation scores them '
         'beside the test split. Choose hyper-parameters on it, never on the test split. 0: no '
         'validation split.'), flag='int')
    real_data: str = setting('auto', RERUN_SAFE,
        ("How real images are held: 'memory' reads the splits whole; 'stream' writes them once "
         'to a class-sorted uint8 cache on disk (--real_cache_dir) and reads every batch from '
         'it, memory-mapped, so datasets larger than memory work and draw the same images; '
         "'auto' streams splits larger than 1/8 of this machine's memory. TFDS datasets only "
         '(folder: datasets are read whole).'), choices=choices.REAL_DATA, flag='enum')
    real_cache_dir: str | None = setting(None, RERUN_SAFE,
        ('Local directory of the streamed-data cache (--real_data); default '
         '<data_dir>/esp_tf_cache. Runs of one dataset share it.'), flag='str')
    zca: bool = setting(False, RUN,
        ('ZCA-whiten the network inputs (fit on the training images, eps 0.1, as MTT does for '
         'CIFAR at IPC 1 and 10) instead of per-channel mean/std; experts, condensation and '
         'evaluation all see whitened images. Needs --noclip_pixels.'), flag='bool')


@dataclasses.dataclass(frozen=True)
class NetConfig:
    """The student / expert network."""
    model: str = setting('convnet3', RUN,
        'Student/expert network (models.ARCHS).', flag='str')
    width: int = setting(128, RUN,
        "ConvNet width (128 in the field's ConvNet-3).", flag='int')
    depth: int = setting(3, RUN,
        "ConvNet depth (3 in the field's ConvNet-3).", flag='int')


@dataclasses.dataclass(frozen=True)
class ExpertsConfig:
    """The expert trajectories (MTT's buffer recipe) and the segments drawn from them."""
    experts_dir: str | None = setting(None, RERUN_SAFE,
        'Trajectory store; default <workdir>/experts. Share it across runs.', flag='str')
    num_experts: int = setting(100, EXPERTS,
        'Expert trajectories to train (MTT 100, ESP paper 1000).', flag='int')
    expert_epochs: int = setting(50, EXPERTS,
        'Epochs per expert; snapshots = epochs + 1.', flag='int')
    expert_lr: float = setting(0.01, EXPERTS,
        'Expert SGD learning rate (constant, no momentum).', flag='float')
    expert_batch: int = setting(256, EXPERTS,
        'Expert batch size.', flag='int')
    accept_weak_experts: bool = setting(False, RERUN_SAFE,
        ('Store experts whose test accuracy stays within 1.5x of chance (they learned nothing, '
         'e.g. a diverged --expert_lr); refused by default.'), flag='bool')
    expert_dsa: bool = setting(True, EXPERTS,
        'DSA augmentation while training experts (MTT: on).', flag='bool')
    segment_length: int = setting(2, EXPERTS,
        'T: expert epochs spanned by one subspace (T+1 snapshots).', flag='int')
    max_start_epoch: int = setting(20, EXPERTS,
        ("Segments start at an epoch drawn from 0..this-1 (exclusive, as MTT's "
         'max_start_epoch); experts need this - 1 + --segment_length epochs.'), flag='int')


@dataclasses.dataclass(frozen=True)
class CondenseConfig:
    """The condensation loop, whatever the method and parameterisation."""
    method: str = setting('esp', RUN,
        ('Condensation method (esp_tf.methods, or one registered there): esp, or the baselines '
         "dm (distribution matching) and tm (MTT). Flags marked 'method setting' default to "
         "the method's own (its Config in esp_tf/methods/<method>.py); flags.txt records the "
         'values used.'), flag='str')
    param: str = setting('pixels', RUN,
        ('Synthetic-set parameterisation (synthetic.PARAMETERISATIONS, or one registered '
         'there): pixels, or latents: codes + shared decoders (paper 4.2, after KFS). Flags '
         "marked 'param setting' default to the parameterisation's own (its Config in "
         'esp_tf/synthetic.py).'), flag='str')
    ipc: int = setting(1, RUN,
        'Images per class of the condensed set (the storage budget).', flag='int')
    init: str = setting('real', RUN,
        'Synthetic init: real images or Gaussian noise (paper).', choices=choices.INITS, flag='enum')
    iterations: int = setting(1000, RUN,
        'Outer iterations; each picks a new expert segment.', flag='int')
    lr_schedule: str = setting('linear', RUN,
        'Synthetic lr schedule (paper: linear decay).', choices=choices.LR_SCHEDULES, flag='enum')
    dsa: bool = setting(True, RUN,
        'Differentiable Siamese augmentation during condensation.', flag='bool')
    clip_pixels: bool = setting(True, RUN,
        ('Clip synthetic renders to the real pixel range 0..255 (valid images for uint8 export '
         'and BatchNorm networks); --noclip_pixels: unbounded.'), flag='bool')
    range_map: str = setting('clip', RUN,
        ('How --clip_pixels keeps renders inside the pixel range: clip (a value at a bound '
         'gets no gradient), or tanh (a smooth map into the range; every value keeps its '
         'gradient).'), choices=choices.RANGE_MAPS, flag='enum')
    jit_compile: bool = setting(False, RERUN_SAFE,
        'XLA-compile the ESP step (recommended on GPU).', flag='bool')
    ckpt_every: int = setting(50, RERUN_SAFE,
        'Checkpoint the synthetic set every this many iterations.', flag='int')
    log_every: int = setting(10, RERUN_SAFE,
        'Log metrics every this many iterations.', flag='int')


@dataclasses.dataclass(frozen=True)
class ScaleConfig:
    """Scaling out (README 'Scaling out'): scheduling only, a rerun may change it."""
    worker_index: int | None = setting(None, RERUN_SAFE,
        ("This worker's index among --num_workers expert-generation workers (trains experts k "
         'with k %% num_workers == worker_index into the shared --experts_dir); default: from '
         'TF_CONFIG, else the only worker.'), flag='int')
    num_workers: int | None = setting(None, RERUN_SAFE,
        ('Expert-generation workers filling one --experts_dir (with --worker_index); default: '
         'the chief + worker tasks of TF_CONFIG, else 1.'), flag='int')
    strategy: str = setting('none', RERUN_SAFE,
        ('tf.distribute strategy of the condensation: none (one device), mirrored (every local '
         'GPU, data-parallel), multi_worker (MultiWorkerMirroredStrategy across the TF_CONFIG '
         'cluster).'), choices=STRATEGIES, flag='enum')


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Evaluation: fresh networks trained on the condensed set (standard protocol)."""
    eval_epochs: int = setting(1000, EVALUATION,
        ('Training epochs per evaluation run (lr x0.1 at half), as both protocols. '
         "esp_tf.evaluate --full: 50 unless given (MTT's expert length; the paper gives no "
         'full-data recipe).'), flag='int')
    eval_runs: int = setting(5, EVALUATION,
        ('Evaluation runs (seeds) per architecture; mean +- std reported (the field reports '
         '5).'), flag='int')
    eval_batch: int = setting(256, EVALUATION,
        "Evaluation batch size (esp_tf.evaluate --protocol=idc: IDC's 64 unless given).", flag='int')
    eval_lr: float = setting(0.01, EVALUATION,
        "Evaluation SGD learning rate (momentum 0.9, wd 5e-4; both protocols' 0.01).", flag='float')
    eval_dsa: bool = setting(True, EVALUATION,
        'DSA during evaluation training (off loses several points).', flag='bool')
    eval_arch: str | None = setting(None, RERUN_SAFE,
        ('Architecture trained on the condensed set (models.ARCHS); default: the condensation '
         'network (--model/--depth), as the field evaluates ConvNet-3 sets on ConvNet-3 and '
         "Tiny ImageNet's ConvNet-4 sets on ConvNet-4."), flag='str')
    baselines: tuple = setting(('random',), RERUN_SAFE,
        ('Real-subset baselines evaluated beside the condensed set: random, herding (on expert '
         "0's final embeddings)."), flag='list')


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """The exports (TFDS dataset, SavedModels)."""
    export_name: str | None = setting(None, RERUN_SAFE,
        'TFDS name of the exported set (default esp_<dataset>_ipc<k>).', flag='str')


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Every setting of a run, nested by what it is about (see the module docstring)."""
    workdir: str | None = setting(None, RERUN_SAFE,
        'Output directory of this run (flags, checkpoints, metrics, exports).', flag='str')
    phases: tuple = setting(choices.PHASES, RERUN_SAFE,
        'Phases to run, in this order: experts,condense,evaluate,export', flag='list')
    seed: int = setting(0, RUN,
        'Run seed; every random draw derives from it. Evaluation run i trains from seed + i.', flag='int')
    restart: bool = setting(False, NOT_RECORDED,
        ('Start over in --workdir: its results are moved aside into <workdir>/previous-<time>/ '
         '(nothing is deleted; experts are kept).'), flag='bool')
    verbose: bool = setting(False, NOT_RECORDED,
        'On an error, show the Python traceback too.', flag='bool')
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    net: NetConfig = dataclasses.field(default_factory=NetConfig)
    experts: ExpertsConfig = dataclasses.field(default_factory=ExpertsConfig)
    condense: CondenseConfig = dataclasses.field(default_factory=CondenseConfig)
    method: object = None        # the Config of condense.method (esp_tf.methods); None: its defaults.
    #                              Its `dsa` follows condense.dsa (one --dsa for the whole run).
    param: object = None         # the Config of condense.param (synthetic.PARAMETERISATIONS); None: its defaults
    scale: ScaleConfig = dataclasses.field(default_factory=ScaleConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    export: ExportConfig = dataclasses.field(default_factory=ExportConfig)


# The groups of RunConfig, in flag-definition order, and its own (top-level) settings.
GROUPS = {"data": DataConfig, "net": NetConfig, "experts": ExpertsConfig, "condense": CondenseConfig,
          "scale": ScaleConfig, "eval": EvalConfig, "export": ExportConfig}
TOP = tuple(f.name for f in dataclasses.fields(RunConfig) if "identity" in f.metadata)

METHOD_FLAGS = (
    flag_spec('inner_steps', 'int', ('Method setting. esp: N projected student steps (= synthetic updates) per iteration; '
         'tm: unrolled student steps per update.')),
    flag_spec('beta', 'float', 'Method setting (esp). Weight of the projection loss (paper 4.2).'),
    flag_spec('inner_lr', 'float', 'Method setting (esp). Projected-SGD student learning rate (paper 4.2).'),
    flag_spec('losses', 'list', ('Method setting (esp). Outer loss terms: proj, dm or both (paper Table 4); default '
         'both.')),
    flag_spec('dm_reduction', 'enum', before_added='sum', help=("Method setting (esp). How ESP's L_DM reduces the squared distances of class-mean "
         "embeddings: sum over classes and features (DM's code), class_mean (eq. 8 as "
         'written), element_mean (MSE). Default sum, chosen on the validation splits of CIFAR-10 '
         'and Fashion-MNIST (BENCHMARKS.md); at beta 1e-5 it leaves the projection term nearly '
         "inert (pull ~1e-4), element_mean makes it pull about as hard as L_DM. Sets what --beta "
         "means; metrics.jsonl logs the resulting pull ratio ('pull')."), choices=choices.DM_REDUCTIONS),
    flag_spec('real_per_class', 'int', ('Method setting (esp, dm). Real images per class in each DM term, drawn afresh every '
         'update; 0: every real training image of the class (the class mean needs no gradient: '
         'forward passes only, in chunks; on CIFAR-10 that is 4,500-5,000 forwards per class '
         'per update).')),
    flag_spec('syn_batch', 'int', ('Method setting (esp, tm). Synthetic images per update (0 or unset = all): esp takes '
         "a random class-balanced slice (the paper's Figure 8 study); tm per unrolled step "
         "(MTT's batch_syn).")),
    flag_spec('syn_chunk', 'int', identity=RERUN_SAFE, help=('Method setting (esp, dm). The exact gradient over the whole synthetic set is '
         'computed in pieces of at most this many renders, so memory grows with the piece, not '
         'the set (esp_tf/chunks.py); unset: 256 at 32x32, scaled by the image area; 0: the '
         'whole set at once. Sets no larger than one piece cost nothing extra; larger ones '
         'about one more forward pass.')),
    flag_spec('student_lr_init', 'float', "Method setting (tm). Initial value of the learnable student lr (MTT's lr_teacher)."),
    flag_spec('student_lr_lr', 'float', "Method setting (tm). SGD lr of the learnable student lr (MTT's lr_lr)."),
)
PARAM_FLAGS = (
    flag_spec('pixels_lr', 'float', ("Param setting (pixels). Learning rate of synthetic pixels; default: the method's own "
         '(Method.default_lr_pixels, with its optimizer: Adam for esp, SGD with momentum 0.5 '
         'for dm and tm).')),
    flag_spec('codes_lr', 'float', 'Param setting (latents). Adam lr of latent codes (paper 4.2: 0.1).'),
    flag_spec('decoders_lr', 'float', 'Param setting (latents). Adam lr of the shared decoders (paper 4.2: 0.01).'),
    flag_spec('num_decoders', 'int', 'Param setting (latents). Shared decoders; images per class = codes x decoders.'),
    flag_spec('latent_downsample', 'int', before_added='2', help=('Param setting (latents). Latent codes are image size / this; unset: 4 at '
         'IPC 1, 2 above (chosen on CIFAR-10 and Fashion-MNIST, esp_tf/synthetic.py default_downsample).')),
    flag_spec('latent_channels', 'int', ("Param setting (latents). Channels of a latent code; unset: the image's (the first "
         'image-channels carry the real-image init).')),
    flag_spec('decoder', 'enum', ('Param setting (latents). Decoder architecture (esp_tf/synthetic.py): residual '
         '(conv3x3 on the code, bilinear upsampling, conv3x3) or transposed (a learned '
         'upsampling by a transposed convolution, as KFS), each beside an identity-initialised '
         'linear skip.'), choices=choices.DECODERS),
    flag_spec('decoder_hidden', 'int', ("Param setting (latents). Channels inside each decoder; the decoders' floats count "
         'against the budget.')),
    flag_spec('decoder_init', 'float', ("Param setting (latents). Scale of each decoder's residual branch at init, in "
         'normalised pixel units: how differently the decoders start.')),
)
# The settings esp_tf.evaluate shares with esp_tf.train (shared_flags.py defines their flags).
SHARED = ("data_dir", "seed", "verbose", "eval_epochs", "eval_runs", "eval_batch", "eval_lr", "eval_dsa")


def run_fields():
    """(group or None for RunConfig's own, dataclass field) of every run-level setting, in order."""
    for group, cls in GROUPS.items():
        for field in dataclasses.fields(cls):
            yield group, field
    for field in dataclasses.fields(RunConfig):
        if "identity" in field.metadata:
            yield None, field


def flag_specs() -> list:
    """A FlagSpec of every setting's flag, in definition order, with its default: the run-level
    settings' (default from their field), then the method and parameterisation settings
    (default None). Returns (spec, default) pairs."""
    out = [(FlagSpec(f.name, f.metadata["flag"], f.metadata["help"], f.metadata["choices"]), f.default)
           for _, f in run_fields()]
    return out + [(spec, None) for spec in METHOD_FLAGS + PARAM_FLAGS]


def names_with(identity: str) -> tuple:
    """The run-level settings of one identity class, and method/parameterisation settings marked
    with it (e.g. syn_chunk: RERUN_SAFE)."""
    return (tuple(f.name for _, f in run_fields() if f.metadata["identity"] == identity)
            + tuple(s.name for s in METHOD_FLAGS + PARAM_FLAGS if s.identity == identity))


def added_defaults() -> dict:
    """Settings whose value in runs recorded before the flag existed is not the flag's default."""
    return {s.name: s.before_added for s in METHOD_FLAGS + PARAM_FLAGS if s.before_added is not None}
