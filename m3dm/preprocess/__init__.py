"""Preprocessing: MVTec 3D-AD cleaning (plane removal, padding, DBSCAN) and the Eyecandies conversion."""
