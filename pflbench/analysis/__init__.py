"""Analysis: run records in, leaderboards, statistics and reports out (pandas, scipy; no torch).

`leaderboard` (tables from the records), `statistics` (intervals, paired tests, ranks),
`published` (the FedOBP paper's numbers beside cells run under its protocol), `report` (plots
and the report page).
"""
