"""Analysis over stored points: the query vocabulary, alert evaluation, anomaly marks, backtrack."""
