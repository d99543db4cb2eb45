// Work items spread over the intra-op threads by their costs: longest first onto the least loaded thread (within 4/3
// of the best plan), for ops that run whole items per thread (csrc/segment.cpp, amx_moe.cpp's weight gradients).
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

namespace smoe_spread {

struct Plan {
    std::vector<std::vector<int64_t>> items;  // per thread, the indices of its items
    int64_t most = 0, total = 0;              // the largest thread's load, and all items' cost

    // whether the largest thread's load is within (num / den) of an even share
    bool even_within(int64_t num, int64_t den) const {
        return den * int64_t(items.size()) * most <= num * total;
    }
};

inline Plan spread(const std::vector<int64_t>& cost, int64_t threads) {
    Plan plan;
    plan.items.resize(threads);
    std::vector<int64_t> order(cost.size()), load(threads, 0);
    std::iota(order.begin(), order.end(), int64_t(0));
    std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return cost[x] > cost[y]; });
    for (const int64_t i : order) {
        const int64_t t = std::min_element(load.begin(), load.end()) - load.begin();
        plan.items[t].push_back(i);
        load[t] += cost[i];
        plan.total += cost[i];
    }
    plan.most = *std::max_element(load.begin(), load.end());
    return plan;
}

}  // namespace smoe_spread
