-- The recorded epochs of one run on one dataset in a split, in order.
SELECT DISTINCT epoch FROM routing WHERE run = $run AND dataset = $dataset AND split = $split ORDER BY epoch
