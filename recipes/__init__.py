"""Recipes: one sub-package per workload, each exposing `RECIPE` (a `gradlane.recipe.Recipe`)."""

from __future__ import annotations

from gradlane.registry import Registry

RECIPES = Registry("recipe", "gradlane.recipes")
RECIPES.add("equivariant", "gradlane.recipes.equivariant:RECIPE")
RECIPES.add("lm", "gradlane.recipes.lm:RECIPE")
RECIPES.add("nerf_distill", "gradlane.recipes.nerf_distill:RECIPE")
RECIPES.add("vision", "gradlane.recipes.vision:RECIPE")
