"""Result tables: VTAB-1k summaries laid out like the paper's Tables 5-7
(:mod:`.vtab1k_table`)."""
from .vtab1k_table import (METHOD_NAMES, PAPER_VTAB1K, format_markdown, group_of_tasks,
                           mean_std, paper_row, summarize)

__all__ = ['METHOD_NAMES', 'PAPER_VTAB1K', 'format_markdown', 'group_of_tasks',
           'mean_std', 'paper_row', 'summarize']
