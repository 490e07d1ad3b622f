"""One page per run: `<run>/report/report.md` and its PNG figures, rebuilt from the run directory alone.

`collect` reads what the stages left (stage records, metrics.jsonl, search history and masks,
fine-tuning results and predictions); `baseline` computes the unigram reference a masked-LM loss is
judged against; `figures` and `search_plots` draw (matplotlib, headless); `page` writes the Markdown.
`provenance` records, at run time, each command with the versions and hardware it ran on, so the
header does not depend on the machine that builds the report. Nothing here imports a stage.
"""

from __future__ import annotations
