"""Run directories -> the paper's comparisons: tables, figures, the tuned report, the variance
figures (pandas, matplotlib, scipy). Reads files only: no other layer of the package is imported.

runs.py      run directories -> one tidy DataFrame (one row per run and evaluation)
wandb_runs.py  a W&B sweep's runs (offline files or the API) -> the same DataFrame
drift.py     did the machine keep its speed between the runs of a pair (reference workload)
compare.py   time to loss or accuracy, speedups with intervals, values at equal train_time
figures.py   training loss and test error against train_time; time-to-loss bars
tables.py    markdown tables, and a comparison's report files (aggregate.py, time_to_loss.py)
tuning.py    the tuned comparison: selection on a validation split, report
switch.py    the tau switch over training against the measured cost of a step
variance.py  variance.csv -> the paper's orderings, summary, figure
styles.py    one colour, line style and marker per sampler

``from importance_sampling import analysis`` gives the names of runs, compare, figures and tables.
"""

from __future__ import annotations

from . import switch  # noqa: F401
from .compare import (  # noqa: F401
    accuracy_to_error,
    at_time,
    common_time,
    curves,
    default_accuracy_targets,
    default_targets,
    equal_time_at,
    equal_time_table,
    first_crossing,
    log_ratio_interval,
    paired_ratios,
    round_up,
    speedup,
    time_to_accuracy,
    time_to_loss,
    value_at,
)
from .figures import (  # noqa: F401
    CENSORED_HATCH,
    censored_patch,
    figure,
    focus_range,
    legend_below,
    plot_curves,
    plot_time_to_loss,
)
from .runs import (  # noqa: F401
    DATASET_NAMES,
    MODEL_NAMES,
    RUN_COLUMNS,
    RUNS_CSV,
    MixedRunsError,
    check_one_experiment,
    collect_runs,
    find_runs,
    load,
    newest_sweep,
    plural,
    read_run,
    run_table,
    samplers_in_order,
    select_experiment,
    setup_name,
    setups,
    starved_note,
    starved_runs,
    sweep_start,
    title,
    with_run_columns,
)
from .tables import (  # noqa: F401
    equal_time_markdown,
    fmt,
    markdown_table,
    report,
    save,
    time_to_loss_markdown,
)
from .wandb_runs import WandbUnavailable, collect_offline, load_wandb  # noqa: F401
