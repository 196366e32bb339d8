"""Runs side by side, from their records alone: ``vrmoe compare`` (a table) and ``vrmoe dashboard``
(one offline HTML file).

``runs`` finds and reads run dirs, ``compare`` builds and prints the comparison table,
``dashboard`` draws the interactive figures and writes the page. plotly is imported only
when a dashboard is drawn.
"""
