-- The recorded epochs of one run in a split, in order.
SELECT DISTINCT epoch FROM routing WHERE run = $run AND split = $split ORDER BY epoch
