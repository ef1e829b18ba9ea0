"""What a user looks at: one registration's QC figure, and a study's HTML report.

* :mod:`.qc`: the QC figure (``qc.png``) and the trajectory's animation;
* :mod:`.study`: ``report.html``, the study's self-contained page.

Both draw with matplotlib; import the module you need.
"""
