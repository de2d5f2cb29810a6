"""Analysis: run records in, leaderboards, statistics and reports out (pandas, scipy; no torch).

`leaderboard` (tables from the records), `statistics` (intervals and paired tests within a
cell), `ranking` (mean ranks, Friedman and Nemenyi, win/tie/loss across cells),
`published` (the FedOBP paper's numbers beside cells run under its protocol), `report` (plots
and the report page).
"""
