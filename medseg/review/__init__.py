"""Clinician review that closes the loop: verdicts and corrections come back into the batch and training.

The review page's side lives with the other exports: :mod:`medseg.export.viewer` packs each case's
scan and labels for the offline viewer (``<case>/viewer/volume.js``, written by the ``report``
export), :mod:`medseg.export.review_panel` puts the viewer and the verdict panel on the case pages
and the progress, verdict filter and ``review.json`` download on the index, and
:mod:`medseg.export.risk` orders the index by QC risk. This package takes what comes back:

* :mod:`medseg.review.verdicts` reads ``review.json`` and checks it against its batch;
  :mod:`medseg.review.apply` merges verdicts into the manifest, ``case.json`` and MLflow
  (``medseg review import``);
* :mod:`medseg.review.corrected` reads corrected label maps onto their cases' grids and
  :mod:`medseg.review.collect` makes a data set of them (``medseg review collect``).
"""
